"""The words of the front ends (the two web pages and the terminal chat) in Chinese and English.

One table holds both languages, so a label added in one is added in the other (a test checks
that every key has both). `--ui_language zh|en` (UIArguments) picks one; `zh` is the default
because the project's users are Chinese-speaking. Flag and parameter names (max_new_tokens,
top_p, ...) stay as they are in both languages: they are what the command line and the docs say.
"""

from __future__ import annotations

from typing import Any

LANGUAGES = ("zh", "en")

MESSAGES: dict[str, dict[str, str]] = {
    # generate.py page
    "generate.intro": {
        "zh": "## {title}\n模板 `{template}`。贪心解码会复现模型训练时学到的回答。",
        "en": "## {title}\nTemplate `{template}`. Greedy decoding reproduces what the model was trained to say.",
    },
    "generate.instruction": {"zh": "指令", "en": "Instruction"},
    "generate.instruction_placeholder": {"zh": "告诉我和上海有关的诗句", "en": "告诉我和上海有关的诗句"},
    "generate.input": {"zh": "输入（可选）", "en": "Input (optional)"},
    "generate.run": {"zh": "生成", "en": "Generate"},
    "generate.answer": {"zh": "回答", "en": "Answer"},
    "generate.need_instruction": {"zh": "请先输入指令。", "en": "Type an instruction first."},
    "generate.done": {"zh": "提示 {prompt_tokens} 个 token；{stats}", "en": "{prompt_tokens} prompt tokens; {stats}"},
    # chat.py page
    "chat.conversation": {"zh": "对话", "en": "Conversation"},
    "chat.message_placeholder": {"zh": "输入消息，按 Enter 发送", "en": "Type a message, Enter to send"},
    "chat.send": {"zh": "发送", "en": "Send"},
    "chat.regenerate": {"zh": "重新生成", "en": "Regenerate"},
    "chat.undo": {"zh": "撤销上一轮", "en": "Undo last turn"},
    "chat.clear": {"zh": "清空", "en": "Clear"},
    "chat.save": {"zh": "保存为 JSONL", "en": "Save JSONL"},
    "chat.saved_file": {"zh": "已保存的对话", "en": "Saved conversation"},
    "chat.settings": {"zh": "对话设置", "en": "Conversation settings"},
    "chat.template": {"zh": "模板", "en": "Template"},
    "chat.system": {"zh": "系统提示", "en": "System prompt"},
    "chat.max_memory": {"zh": "max_memory（提示的 token 数）", "en": "max_memory (prompt tokens)"},
    "chat.need_message": {"zh": "请先输入消息。", "en": "Type a message first."},
    "chat.nothing_to_regenerate": {"zh": "还没有可以重新生成的回答。", "en": "Nothing to regenerate yet."},
    "chat.turns": {"zh": "{turns} 轮", "en": "{turns} turn(s)"},
    "chat.new_conversation": {"zh": "新对话", "en": "new conversation"},
    "chat.saved_turns": {"zh": "已保存 {turns} 轮", "en": "saved {turns} turn(s)"},
    "chat.nothing_to_save": {"zh": "还没有可以保存的对话。", "en": "Nothing to save yet: the conversation is empty."},
    "chat.not_kept": {
        "zh": "回答为空或已停止：不计入对话（也不会被保存）",
        "en": "the answer is empty or was stopped: not kept in the conversation (nor saved)",
    },
    # board.py (the training board)
    "board.title": {"zh": "Chinese-Vicuna 训练面板", "en": "Chinese-Vicuna training board"},
    "board.intro": {
        "zh": "配置一次微调，页面显示并运行**同一条命令**（finetune.py / finetune_chat.py / tools/pretrain.py / finetune_dpo.py），评测与导出也一样（tools/eval_choice.py、eval_judge.py、merge_lora.py、convert_to_gguf.py）；运行保存在磁盘上，刷新页面不会中断。",
        "en": "Configure a fine-tune; the page shows and runs **the very command** (finetune.py / finetune_chat.py / tools/pretrain.py / finetune_dpo.py), and so for evaluation and export (tools/eval_choice.py, eval_judge.py, merge_lora.py, convert_to_gguf.py); runs are kept on disk and survive a page reload.",
    },
    "board.tab.configure": {"zh": "配置", "en": "Configure"},
    "board.tab.runs": {"zh": "运行", "en": "Runs"},
    "board.tab.chat": {"zh": "对话", "en": "Chat"},
    "board.tab.evaluate": {"zh": "评测", "en": "Evaluate"},
    "board.tab.export": {"zh": "导出", "en": "Export"},
    "board.base_model": {"zh": "基础模型（本地文件夹，或本地缓存中的 hub id）", "en": "Base model (local folder, or a hub id in the local cache)"},
    "board.stage": {"zh": "训练阶段", "en": "Stage"},
    "board.stage.sft": {"zh": "指令微调", "en": "Instruction SFT"},
    "board.stage.chat_sft": {"zh": "多轮对话微调", "en": "Chat SFT"},
    "board.stage.pretrain": {"zh": "继续预训练", "en": "Continued pretraining"},
    "board.stage.dpo": {"zh": "偏好训练（DPO 等）", "en": "Preference (DPO …)"},
    "board.stage.grpo": {"zh": "强化学习（GRPO 等，可验证奖励）", "en": "RL (GRPO …, verifiable rewards)"},
    "board.reward_funcs": {"zh": "reward_funcs（奖励函数：accuracy、format、length 或 文件.py:函数）", "en": "reward_funcs (accuracy, format, length or file.py:function)"},
    "board.num_generations": {"zh": "num_generations（每个提示采样的回答数）", "en": "num_generations (completions per prompt)"},
    "board.max_completion_length": {"zh": "max_completion_length（回答最多 token 数）", "en": "max_completion_length (tokens per completion)"},
    "board.grpo_loss": {"zh": "grpo_loss（损失）", "en": "grpo_loss"},
    "board.beta": {"zh": "beta（KL 权重，0 = 不用参考模型）", "en": "beta (KL weight, 0 = no reference)"},
    "board.lora_weights": {"zh": "lora_weights（起点适配器，如 SFT 的输出；参考模型也是它）", "en": "lora_weights (the starting adapter, e.g. the SFT output; also the reference)"},
    "board.pref_loss": {"zh": "pref_loss（偏好损失）", "en": "pref_loss"},
    "board.pref_beta": {"zh": "pref_beta", "en": "pref_beta"},
    "board.pref_ftx": {"zh": "pref_ftx（chosen 上的 SFT 损失权重）", "en": "pref_ftx (SFT loss weight on chosen)"},
    "board.memory": {
        "zh": "预计内存（{device}）：**{total}**（权重 {weights}，LoRA + 梯度 + AdamW {adapter}，激活 {activations}，logits {logits}，框架 {framework}；按所有位置都参与训练估计，tools/estimate_memory.py 同一算法）",
        "en": "Memory estimate ({device}): **{total}** (weights {weights}, LoRA + gradients + AdamW {adapter}, activations {activations}, logits {logits}, framework {framework}; every position counted as trained, the algorithm of tools/estimate_memory.py)",
    },
    "board.memory_unknown": {"zh": "预计内存：— （{reason}）", "en": "Memory estimate: — ({reason})"},
    "board.from_cache": {"zh": "；读自本地缓存 `{folder}`", "en": "; read from the local cache `{folder}`"},
    "board.template": {"zh": "模板", "en": "Template"},
    "board.data": {"zh": "数据文件", "en": "Data file"},
    "board.output_dir": {"zh": "输出文件夹", "en": "Output folder"},
    "board.length.cutoff_len": {"zh": "cutoff_len（截断长度）", "en": "cutoff_len"},
    "board.length.block_size": {"zh": "block_size（文本块长度）", "en": "block_size"},
    "board.length.max_prompt_length": {"zh": "max_prompt_length（提示最多 token 数，更长的丢弃）", "en": "max_prompt_length (longer prompts are dropped)"},
    "board.num_epochs": {"zh": "num_epochs（轮数）", "en": "num_epochs"},
    "board.max_steps": {"zh": "max_steps（0 = 按轮数）", "en": "max_steps (0 = by epochs)"},
    "board.learning_rate": {"zh": "learning_rate（学习率）", "en": "learning_rate"},
    "board.micro_batch_size": {"zh": "micro_batch_size（每步样本数）", "en": "micro_batch_size"},
    "board.batch_size": {"zh": "batch_size（全局批大小）", "en": "batch_size (global)"},
    "board.val_set_size": {"zh": "val_set_size（验证样本数）", "en": "val_set_size"},
    "board.lora_r": {"zh": "lora_r（秩）", "en": "lora_r"},
    "board.lora_alpha": {"zh": "lora_alpha", "en": "lora_alpha"},
    "board.lora_dropout": {"zh": "lora_dropout", "en": "lora_dropout"},
    "board.lora_target_modules": {"zh": "lora_target_modules（目标模块）", "en": "lora_target_modules"},
    "board.precision": {"zh": "精度", "en": "Precision"},
    "board.warmup_steps": {"zh": "warmup_steps（预热步数）", "en": "warmup_steps"},
    "board.logging_steps": {"zh": "logging_steps（记录间隔）", "en": "logging_steps"},
    "board.save_steps": {"zh": "save_steps（检查点间隔）", "en": "save_steps"},
    "board.seed": {"zh": "seed（随机种子）", "en": "seed"},
    "board.command": {"zh": "命令行（页面运行的就是这条命令）", "en": "Command line (what the page runs)"},
    "board.check": {"zh": "检查模型与数据", "en": "Check model and data"},
    "board.start": {"zh": "开始训练", "en": "Start training"},
    "board.flags_file": {"zh": "参数文件（.yaml / .json）", "en": "Flags file (.yaml / .json)"},
    "board.save_flags": {"zh": "保存参数", "en": "Save flags"},
    "board.load_flags": {"zh": "读取参数", "en": "Load flags"},
    "board.flags_saved": {"zh": "已保存 {path}；命令行用法：`{command}`", "en": "saved {path}; on the command line: `{command}`"},
    "board.flags_loaded": {"zh": "已读取 {path}", "en": "loaded {path}"},
    "board.model_info": {
        "zh": "**{architecture}**，{size} 参数，{layers} 层，hidden {hidden}，上下文 {context}；词表 {vocab}（分词器 {tokenizer}）；自带模板：{template}（{reason}）",
        "en": "**{architecture}**, {size} parameters, {layers} layers, hidden {hidden}, context {context}; vocabulary {vocab} (tokenizer {tokenizer}); template it carries: {template} ({reason})",
    },
    "board.doctor": {
        "zh": "✓ 数据检查：{records} 条记录，{truncated} 条超过 cutoff_len={cutoff} 被截断，{no_trainable} 条没有可训练的 token；长度 p95 {p95}，最长 {longest} 个 token",
        "en": "✓ data doctor: {records} records, {truncated} truncated at cutoff_len={cutoff}, {no_trainable} with no trainable token; length p95 {p95}, longest {longest} tokens",
    },
    "board.doctor_pairs": {
        "zh": "✓ 偏好数据检查：{records} 条记录，{pairs} 对 chosen/rejected，{kto} 条 KTO 样本，{identical} 对两个回答相同，{truncated} 对超过 cutoff_len={cutoff} 被截断提示",
        "en": "✓ preference data doctor: {records} records, {pairs} chosen/rejected pairs, {kto} KTO samples, {identical} pairs with identical answers, {truncated} pairs with the prompt cut at cutoff_len={cutoff}",
    },
    "board.doctor_prompts": {
        "zh": "✓ RL 提示检查：{records} 条记录 → {prompts} 条提示，{too_long} 条超过 max_prompt_length={cutoff} 被丢弃；最长提示 {longest} 个 token；奖励函数 {rewards} 所需的列每条都有",
        "en": "✓ RL prompt check: {records} records → {prompts} prompts, {too_long} dropped as longer than max_prompt_length={cutoff}; longest prompt {longest} tokens; every record has the columns the rewards {rewards} read",
    },
    "board.template_reason.saved": {"zh": "模型文件夹里的 prompt_template.json", "en": "prompt_template.json in the model folder"},
    "board.template_reason.chat_template": {"zh": "分词器自带的 chat_template", "en": "the tokenizer's chat_template"},
    "board.template_reason.none": {
        "zh": "模型没有保存模板，训练用所选模板",
        "en": "none saved with the model; training uses the one chosen",
    },
    "board.no_doctor": {"zh": "（继续预训练的纯文本数据不做数据检查）", "en": "(plain-text pretraining data: no data doctor)"},
    "board.started": {"zh": "已开始运行 {run}（见“运行”页）", "en": "started run {run} (see the Runs tab)"},
    "board.run": {"zh": "运行记录", "en": "Run"},
    "board.no_run": {"zh": "还没有运行。", "en": "No run yet."},
    "board.progress": {
        "zh": "**{status}** · 步数 {step}/{total} · loss {loss} · 学习率 {lr} · {speed} tokens/s · 剩余时间 {eta} · 输出 `{output_dir}`",
        "en": "**{status}** · step {step}/{total} · loss {loss} · lr {lr} · {speed} tokens/s · ETA {eta} · output `{output_dir}`",
    },
    "board.progress_steps": {
        "zh": "**{status}** · {kind} · 第 {step}/{steps} 条命令 · 输出 `{output_dir}`",
        "en": "**{status}** · {kind} · command {step}/{steps} · output `{output_dir}`",
    },
    "board.kind": {"zh": "类型", "en": "Kind"},
    "board.status": {"zh": "状态", "en": "Status"},
    "board.kind.eval": {"zh": "评测", "en": "evaluation"},
    "board.kind.export": {"zh": "导出", "en": "export"},
    "board.run_memory": {"zh": " · 内存 RSS {rss}", "en": " · RSS {rss}"},
    "board.gpu_memory": {"zh": " · 显存 {gpu}", "en": " · GPU memory {gpu}"},
    "board.exit": {"zh": " · 退出码 {code}", "en": " · exit status {code}"},
    "board.status.running": {"zh": "运行中", "en": "running"},
    "board.status.finished": {"zh": "已完成", "en": "finished"},
    "board.status.stopped": {"zh": "已停止（可继续）", "en": "stopped (resumable)"},
    "board.status.failed": {"zh": "失败", "en": "failed"},
    "board.status.ended": {"zh": "已结束", "en": "ended"},
    "board.resume": {"zh": "继续训练", "en": "Resume"},
    "board.stopping": {
        "zh": "已向 {run} 发送 Ctrl-C：在本步结束时停止，保留最后一个完整检查点",
        "en": "Ctrl-C sent to {run}: it stops at the end of the step, keeping its last complete checkpoint",
    },
    "board.resumed": {"zh": "{run} 从最新的完整检查点继续", "en": "{run} continues from its newest complete checkpoint"},
    "board.loss_curve": {"zh": "loss 曲线", "en": "Loss curve"},
    "board.console": {"zh": "日志末尾", "en": "Log tail"},
    "board.adapter": {"zh": "LoRA 适配器文件夹", "en": "LoRA adapter folder"},
    "board.export_dir": {"zh": "合并后模型的文件夹", "en": "Merged model folder"},
    "board.export": {"zh": "合并导出", "en": "Merge and export"},
    "board.format": {"zh": "格式", "en": "Format"},
    "board.format.hf": {"zh": "HF safetensors", "en": "HF safetensors"},
    "board.format.pth": {"zh": "Meta .pth", "en": "Meta .pth"},
    "board.format.gguf": {"zh": "GGUF（llama.cpp）", "en": "GGUF (llama.cpp)"},
    "board.format.ollama": {"zh": "GGUF + Ollama Modelfile", "en": "GGUF + Ollama Modelfile"},
    "board.outtype": {"zh": "GGUF 量化（outtype）", "en": "GGUF quantization (outtype)"},
    "board.exported": {"zh": "✓ 已写出：{files}", "en": "✓ written: {files}"},
    "board.need_adapter": {"zh": "请先填写 LoRA 适配器文件夹（在“运行”页选择一次训练）。", "en": "Give the LoRA adapter folder first (pick a training run in the Runs tab)."},
    "board.need_endpoint": {"zh": "请填写评审模型的 OpenAI 兼容地址（judge_api_base）。", "en": "Give the judge's OpenAI-compatible endpoint (judge_api_base)."},
    "board.eval_dir": {"zh": "评测结果文件夹", "en": "Evaluation folder"},
    "board.choice_eval": {"zh": "选择题评测（C-Eval / CMMLU / MMLU，tools/eval_choice.py）：基础模型 vs 加适配器", "en": "Multiple choice (C-Eval / CMMLU / MMLU, tools/eval_choice.py): base vs with the adapter"},
    "board.benchmark": {"zh": "基准", "en": "Benchmark"},
    "board.bench_dir": {"zh": "数据文件夹（dev/ val/ test/）", "en": "Data folder (dev/ val/ test/)"},
    "board.split": {"zh": "split", "en": "split"},
    "board.ntrain": {"zh": "ntrain（few-shot 示例数）", "en": "ntrain (few-shot examples)"},
    "board.subjects": {"zh": "科目（逗号分隔，空 = 全部）", "en": "Subjects (comma list, empty = all)"},
    "board.run_eval": {"zh": "运行选择题评测", "en": "Run the multiple-choice evaluation"},
    "board.subject": {"zh": "科目", "en": "Subject"},
    "board.before": {"zh": "基础模型", "en": "Base"},
    "board.after": {"zh": "加适配器", "en": "With adapter"},
    "board.average": {"zh": "平均", "en": "Average"},
    "board.question": {"zh": "题目", "en": "Question"},
    "board.answer": {"zh": "答案", "en": "Answer"},
    "board.judge_eval": {"zh": "评审模型打分（MT-bench 式，tools/gen_model_answer.py + tools/eval_judge.py，成对比较）", "en": "LLM judge (MT-bench style, tools/gen_model_answer.py + tools/eval_judge.py, pairwise)"},
    "board.questions": {"zh": "问题文件", "en": "Question file"},
    "board.judge_api_base": {"zh": "评审接口 judge_api_base（密钥取自环境变量 OPENAI_API_KEY）", "en": "Judge endpoint judge_api_base (key from OPENAI_API_KEY)"},
    "board.judge_model": {"zh": "评审模型", "en": "Judge model"},
    "board.run_judge": {"zh": "生成回答并评审", "en": "Answer and judge"},
    "board.judge_result": {
        "zh": "加适配器胜 {win_a} · 基础模型胜 {win_b} · 平 {tie} · 失败 {failed}",
        "en": "with adapter wins {win_a} · base wins {win_b} · ties {tie} · failed {failed}",
    },
    # both pages
    "stop": {"zh": "停止", "en": "Stop"},
    "decoding": {"zh": "解码参数", "en": "Decoding"},
    "generating": {"zh": "生成中…", "en": "generating…"},
    "beam_search": {"zh": "beam search：回答完成后一次显示", "en": "beam search: the answer shows when it is complete"},
    "stats": {
        "zh": "生成 {new_tokens} 个 token，用时 {seconds:.1f} 秒（{tokens_per_second:.1f} tokens/s），结束原因：{stopped_by}",
        "en": "{new_tokens} tokens in {seconds:.1f} s ({tokens_per_second:.1f} tokens/s), ended by {stopped_by}",
    },
    "decoding.max_new_tokens": {"zh": "max_new_tokens（最多生成的 token 数）", "en": "max_new_tokens"},
    "decoding.min_new_tokens": {"zh": "min_new_tokens（至少生成的 token 数）", "en": "min_new_tokens"},
    "decoding.do_sample": {"zh": "do_sample（关 = 贪心解码）", "en": "do_sample (off = greedy)"},
    "decoding.temperature": {"zh": "temperature（采样时）", "en": "temperature (sampling)"},
    "decoding.top_p": {"zh": "top_p（采样时）", "en": "top_p (sampling)"},
    "decoding.top_k": {"zh": "top_k（采样时，0 = 全部）", "en": "top_k (sampling, 0 = all)"},
    "decoding.num_beams": {"zh": "num_beams（>1 时不能流式输出）", "en": "num_beams (>1: no streaming)"},
    "decoding.repetition_penalty": {"zh": "repetition_penalty（重复惩罚）", "en": "repetition_penalty"},
    # terminal chat (chat.py --cli)
    "cli.help": {
        "zh": "命令：/reset（新对话），/undo（撤销上一轮），/regen（重新回答上一个问题），/save [文件]，/exit（退出）—— Ctrl-C 停止当前回答",
        "en": "commands: /reset (new conversation), /undo (drop the last turn), /regen (answer the last question again), /save [FILE], /exit — Ctrl-C stops an answer",
    },
    "cli.start": {"zh": "使用模板 {template} 对话；{help}", "en": "chat with template {template}; {help}"},
    "cli.user": {"zh": "用户：", "en": "User: "},
    "cli.assistant": {"zh": "助手：", "en": "Assistant: "},
    "cli.new_conversation": {"zh": "[新对话]", "en": "[new conversation]"},
    "cli.undone": {"zh": "[已撤销；剩余 {turns} 轮]", "en": "[undone; {turns} turn(s) left]"},
    "cli.saved": {"zh": "[已保存到 {path}]", "en": "[saved to {path}]"},
    "cli.not_saved": {"zh": "[未保存：{error}]", "en": "[not saved: {error}]"},
    "cli.nothing_to_regenerate": {"zh": "[没有可以重新生成的回答]", "en": "[nothing to regenerate]"},
    "cli.unknown_command": {"zh": "[未知命令 {command}；{help}]", "en": "[unknown command {command}; {help}]"},
    "cli.stopped": {"zh": " [已停止；本轮不计入对话]", "en": " [stopped; this turn is not kept]"},
    "cli.empty_answer": {"zh": "[回答为空；本轮不计入对话]", "en": "[empty answer; this turn is not kept]"},
    "cli.bad_input": {
        "zh": "[这一行不是有效的 UTF-8 文本，已忽略；请检查终端的编码设置]",
        "en": "[that line is not valid UTF-8 text and was ignored; check the terminal's encoding]",
    },
    "cli.bye": {"zh": "[再见]", "en": "[bye]"},
    "cli.max_new_tokens_clamped": {
        "zh": "[max_new_tokens={asked} 超出上下文 n_ctx={n_ctx}，改为 {used}]",
        "en": "[max_new_tokens={asked} does not fit the context n_ctx={n_ctx}; using {used}]",
    },
}


class Messages:
    """The table in one language: `t("chat.send")`, `t("chat.turns", turns=2)`."""

    def __init__(self, language: str = "zh") -> None:
        if language not in LANGUAGES:
            raise ValueError(f"ui language {language!r}: use one of {', '.join(LANGUAGES)}")
        self.language = language

    def __call__(self, key: str, **values: Any) -> str:
        return MESSAGES[key][self.language].format(**values)

    def stats(self, stats: Any) -> str:
        """A GenerationStats in words (the status line)."""
        return self(
            "stats",
            new_tokens=stats.new_tokens,
            seconds=stats.seconds,
            tokens_per_second=stats.tokens_per_second,
            stopped_by=stats.stopped_by,
        )
