# shellcheck shell=bash
# Launch logic shared by the inference launchers (generate.sh, chat.sh; sourced, not run).
# A launcher sets TEMPLATE's default, then calls:   run_inference SCRIPT.py [ARGS...]
#   BASE_MODEL   base model folder or hub id (a merged model works without LORA_PATH)
#   LORA_PATH    adapter folder (output_dir or checkpoint-N), stock PEFT adapter or hub id; "" = none
#   TOT_CUDA     GPUs to use, e.g. "0" or "0,1" (several: layers spread with --device_map auto)
#   PORT         page port (default 7860)
#   PRECISION    auto (8bit on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | 8bit | 4bit
#   TEMPLATE     the prompt template the model was trained with
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

run_inference() {
    local script=$1
    shift
    local base=${BASE_MODEL:?set BASE_MODEL to a base model folder or hub id}
    local gpus=${TOT_CUDA:-0}
    local args=(--base_model "$base" --prompt_template "$TEMPLATE" --precision "${PRECISION:-auto}" --server_port "${PORT:-7860}")
    if [ -n "${LORA_PATH-}" ]; then args+=(--lora_weights "$LORA_PATH"); fi
    if [[ "$gpus" == *,* ]]; then args+=(--device_map auto); fi
    CUDA_VISIBLE_DEVICES=$gpus exec python "$script" "${args[@]}" "$@"
}
