"""Instruction data from any OpenAI-compatible endpoint, in the spirit of Chinese-LLaMA-Alpaca's
crawl_prompt.py (sampled topics × task types, realistic inputs, real answers), but parsed,
validated, de-duplicated, rate-limited, retried and resumable.

Each request asks for `records_per_request` alpaca records as a JSON list. Whatever comes back
(a JSON list, a fenced ```json block, prose around it, JSON lines, a list cut off by max_tokens)
is scanned for JSON objects; each becomes an alpaca record or is counted as invalid; exact and
near duplicates (ROUGE-L >= 0.7, chinese_vicuna.datatools.dedupe) of kept records and seed tasks
are dropped and counted. Kept records are appended to the output file one whole line at a time,
so a rerun after a kill keeps every line and continues to exactly `num_samples` records.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chinese_vicuna.checkpoints import check_output_file
from chinese_vicuna.data.records import read_records, validate_instruction
from chinese_vicuna.datatools.dedupe import Deduper
from chinese_vicuna.datatools.ratelimit import SlidingWindowLimiter
from chinese_vicuna.endpoint import openai_client, resolve_api_key
from chinese_vicuna.errors import UserError
from chinese_vicuna.outputlock import hold_output_folder

logger = logging.getLogger(__name__)
NOT_JSON = "replies not JSON"

TOPICS_ZH = [
    "科技", "历史", "文学", "数学", "物理", "化学", "生物", "地理", "经济", "金融", "法律", "医疗健康", "心理",
    "教育", "职场", "编程", "人工智能", "环境保护", "旅游", "美食", "体育", "音乐", "电影", "艺术", "哲学",
    "社会", "政治常识", "家庭生活", "育儿", "宠物", "农业", "交通", "天文", "军事常识", "语言学习", "中国传统文化",
    "节日习俗", "诗词", "成语", "商业管理", "市场营销", "创业", "个人理财", "时尚", "游戏", "日常生活",
]  # fmt: skip
TASK_TYPES_ZH = [
    "开放式问答", "知识问答", "解释概念", "分类", "信息抽取", "摘要", "改写润色", "翻译（中英互译）", "写作（文章、故事、诗歌）",
    "写邮件或书信", "头脑风暴", "列清单", "给出建议", "推理", "数学计算", "写代码", "解释代码", "纠正错误", "比较异同",
    "制定计划", "角色扮演对话", "情感分析", "生成标题", "续写", "问题解答步骤",
]  # fmt: skip
TOPICS_EN = [
    "science", "history", "literature", "mathematics", "programming", "health", "law", "economics", "travel", "food",
    "sports", "music", "film", "art", "philosophy", "education", "careers", "environment", "personal finance", "daily life",
]  # fmt: skip
TASK_TYPES_EN = [
    "open question answering", "explaining a concept", "classification", "information extraction", "summarization",
    "rewriting", "translation", "creative writing", "writing an email", "brainstorming", "giving advice", "reasoning",
    "math word problems", "writing code", "explaining code", "fixing mistakes", "comparison", "planning", "sentiment analysis",
]  # fmt: skip

PROMPT_ZH = """你是一名出色的数据标注员，请为训练中文指令模型编写 {n} 条多样化的任务，每条包含 instruction（指令）、input（输入）和 output（回答）。

要求：
1. 话题从这些里选：{topics}；任务类型从这些里选：{task_types}。尽量每条都不同，不要重复相似的指令。
2. 指令用中文，句式要多样：有的是问句，有的是祈使句；长度一到两句话。
3. 大约一半的任务需要 input：input 必须是真实、具体的材料（一段文字、一段代码、一组数据、一封邮件等），不能只是占位符或对指令的复述，长度不超过 100 字。不需要 input 时填空字符串 ""。
4. output 必须是对指令和输入真正、完整、正确的回答，内容充实，一般不超过 200 字；不要写“好的”“作为AI”之类的套话。
5. 只输出一个 JSON 列表，不要输出其他任何文字，格式如下：
[{{"instruction": "...", "input": "...", "output": "..."}}, ...]
{examples}"""

PROMPT_EN = """You write training data for an instruction-following model. Write {n} diverse tasks, each with an
"instruction", an "input" and an "output".

Rules:
1. Topics to draw from: {topics}. Task types to draw from: {task_types}. Make every task different.
2. Vary the wording: questions and imperatives, one or two sentences each.
3. About half the tasks need an input: a real, concrete piece of text, code, data or an email (not a placeholder
   or a restatement of the instruction), at most 100 words. Otherwise the input is "".
4. The output is a real, complete, correct answer to the instruction and input, substantive but under 200 words.
5. Reply with one JSON list and nothing else:
[{{"instruction": "...", "input": "...", "output": "..."}}, ...]
{examples}"""

EXAMPLES_HEADER = {"zh": "\n参考示例（不要照抄）：\n", "en": "\nExamples of the format (do not copy them):\n"}

# Keys models use instead of the alpaca ones (Chinese field names among them).
KEY_ALIASES = {
    "instruction": ("instruction", "指令", "question", "prompt", "任务"),
    "input": ("input", "输入", "context"),
    "output": ("output", "输出", "answer", "response", "回答", "答案"),
}
# Ways models write "no input".
EMPTY_INPUTS = {"", "无", "无输入", "<无输入>", "<noinput>", "<no input>", "none", "n/a", "null", "空", "-"}


@dataclass
class SelfInstructConfig:
    """Everything one generation run needs (tools/self_instruct.py parses these from flags)."""

    model: str = field(metadata={"help": "Model name at the endpoint, e.g. gpt-4o-mini, deepseek-chat, qwen-plus."})
    num_samples: int = field(metadata={"help": "Unique valid records the output file ends with (a rerun continues to it)."})
    output_file: str = field(metadata={"help": "Alpaca JSONL file; records are appended, one whole line each."})
    api_base: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible base URL (…/v1)."})
    api_key: str | None = field(default=None, repr=False, metadata={"help": "API key (default: $OPENAI_API_KEY); never logged."})
    requests_per_minute: int = field(default=20, metadata={"help": "Never more requests than this in any 60 s (retries included)."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    seed_tasks: str | None = field(default=None, metadata={"help": "Alpaca .json/.jsonl of seed tasks shown as examples."})
    seed_examples_per_request: int = field(default=3, metadata={"help": "Seed tasks shown per request."})
    records_per_request: int = field(default=20, metadata={"help": "Records asked for in each request."})
    language: str = field(default="zh", metadata={"help": "zh (Chinese prompt and data) or en."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    max_tokens: int = field(default=3072, metadata={"help": "Reply length limit (a cut-off list still yields its whole records)."})
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds before a request is abandoned and retried."})
    max_retries: int = field(default=6, metadata={"help": "Retries per request on 429, 5xx and network errors."})
    max_useless_requests: int = field(
        default=20, metadata={"help": "Stop with an error after this many replies in a row with no new record."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampled topics, task types and examples."})
    similarity_threshold: float = field(default=0.7, metadata={"help": "ROUGE-L at or above which a record is a near duplicate."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if self.language not in ("zh", "en"):
            raise UserError(f"--language {self.language}: use zh or en")


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------
def build_prompt(rng: random.Random, n: int, language: str = "zh", examples: list[dict[str, str]] | None = None) -> str:
    """One request's prompt: sampled topics and task types, optional seed tasks as examples."""
    topics, tasks = (TOPICS_ZH, TASK_TYPES_ZH) if language == "zh" else (TOPICS_EN, TASK_TYPES_EN)
    sep = "、" if language == "zh" else ", "
    template = PROMPT_ZH if language == "zh" else PROMPT_EN
    shown = ""
    if examples:
        shown = EXAMPLES_HEADER[language] + "\n".join(json.dumps(e, ensure_ascii=False) for e in examples) + "\n"
    return template.format(
        n=n,
        topics=sep.join(rng.sample(topics, min(6, len(topics)))),
        task_types=sep.join(rng.sample(tasks, min(6, len(tasks)))),
        examples=shown,
    )


# --------------------------------------------------------------------------------------------
# Parsing what models return
# --------------------------------------------------------------------------------------------
def _objects_in(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1 and not any(k in value for k in KEY_ALIASES["instruction"]):
            return lists[0]  # {"data": [...]}
        return [value]
    return [value]


def parse_records(text: str) -> list[Any]:
    """The JSON values a reply holds as candidate records.

    The whole reply (or a fenced block) as JSON first; otherwise every complete top-level JSON
    object found by scanning, which recovers records from prose, JSON lines and a list cut off
    in the middle of its last record.
    """
    decoder = json.JSONDecoder()
    stripped = text.strip()
    candidates = [stripped]
    # ```json ... ``` blocks (any language tag, or none)
    pos = 0
    while (start := stripped.find("```", pos)) >= 0:
        body_start = stripped.find("\n", start)
        end = stripped.find("```", body_start + 1) if body_start >= 0 else -1
        if body_start < 0 or end < 0:
            break
        candidates.append(stripped[body_start + 1 : end].strip())
        pos = end + 3
    for candidate in candidates:
        try:
            return _objects_in(json.loads(candidate))
        except json.JSONDecodeError:
            pass
    found: list[Any] = []
    i = stripped.find("{")
    while i >= 0:
        try:
            value, end = decoder.raw_decode(stripped, i)
        except json.JSONDecodeError:
            i = stripped.find("{", i + 1)
            continue
        found.append(value)
        i = stripped.find("{", end)
    return found


def _field(obj: dict[str, Any], name: str) -> Any:
    for key in KEY_ALIASES[name]:
        if key in obj:
            return obj[key]
    return None


def to_alpaca(obj: Any) -> tuple[dict[str, str] | None, str]:
    """(the alpaca record, "") or (None, why it is invalid)."""
    if not isinstance(obj, dict):
        return None, "not an object"
    instruction, input_, output = _field(obj, "instruction"), _field(obj, "input"), _field(obj, "output")
    if instruction is None:
        return None, "missing instruction"
    if output is None:
        return None, "missing output"
    if input_ is None:
        input_ = ""
    if not all(isinstance(v, str) for v in (instruction, input_, output)):
        return None, "a field is not a string"
    instruction, input_, output = instruction.strip(), input_.strip(), output.strip()
    if not instruction:
        return None, "empty instruction"
    if not output:
        return None, "empty output"
    if input_.lower() in EMPTY_INPUTS:
        input_ = ""
    return {"instruction": instruction, "input": input_, "output": output}, ""


# --------------------------------------------------------------------------------------------
# Requests: rate limit, retries
# --------------------------------------------------------------------------------------------
def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `Retry-After` (seconds or an HTTP date) or `retry-after-ms`, if given."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


class Requester:
    """Chat completions through one limiter, retried on 429 (after Retry-After), 5xx and network errors."""

    def __init__(
        self,
        client: Any,
        config: SelfInstructConfig,
        limiter: SlidingWindowLimiter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.config = config
        self.limiter = limiter
        self.sleep = sleep
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def backoff(self, attempt: int) -> float:
        return min(60.0, 2.0**attempt) * (0.5 + random.random() / 2)

    def complete(self, prompt: str) -> str | None:
        """The reply text, or None when every attempt failed (counted)."""
        import openai

        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            self.limiter.acquire()
            self._count("requests")
            try:
                response = self.client.chat.completions.create(
                    model=cfg.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                )
                return response.choices[0].message.content or ""
            except openai.RateLimitError as exc:
                self._count("rate_limited (429)")
                delay = retry_after_seconds(exc.response.headers)
                delay = self.backoff(attempt) if delay is None else delay
            except openai.APIStatusError as exc:
                if exc.status_code < 500 and exc.status_code not in (408, 409):
                    raise UserError(f"{cfg.api_base}: HTTP {exc.status_code} for model {cfg.model!r}: {exc.message}") from None
                self._count(f"server errors ({exc.status_code})")
                delay = retry_after_seconds(exc.response.headers)
                delay = self.backoff(attempt) if delay is None else delay
            except (openai.APIConnectionError, openai.APITimeoutError):
                self._count("connection errors")
                delay = self.backoff(attempt)
            except (IndexError, AttributeError):
                self._count("malformed responses")
                return None
            except ValueError:  # the body is not JSON (or not UTF-8): not a chat completion endpoint
                self._count(NOT_JSON)
                return None
            if attempt < cfg.max_retries:
                self.sleep(delay)
        self._count("requests given up after retries")
        return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def read_existing(path: Path) -> list[dict[str, str]]:
    """Records already in the output file; a last line cut off by a kill is removed (and logged)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        logger.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run", path, len(raw) - cut)
        with path.open("r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    records = []
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{lineno}: invalid JSON ({exc.msg}); this output file was not written by self_instruct.py, pick another --output_file"
            ) from None
        record, why = to_alpaca(value)
        if record is None:
            raise UserError(f"{path}:{lineno}: not an alpaca record ({why}); pick another --output_file")
        records.append(record)
    return records


def load_seed_tasks(path: str) -> list[dict[str, str]]:
    return [validate_instruction(r) for r in read_records(path)]


@dataclass
class RunResult:
    kept: int
    already_there: int
    counts: dict[str, int]


def generate(
    config: SelfInstructConfig,
    client: Any | None = None,
    limiter: SlidingWindowLimiter | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RunResult:
    """Append records to `config.output_file` until it holds `num_samples` unique valid ones."""
    if config.num_samples < 1:
        raise UserError(f"--num_samples {config.num_samples}: must be at least 1")
    if config.requests_per_minute < 1 or config.concurrency < 1:
        raise UserError("--requests_per_minute and --concurrency must be at least 1")
    out = Path(config.output_file)
    check_output_file(out, "--output_file")
    hold_output_folder(out, "--output_file")
    existing = read_existing(out)
    seeds = load_seed_tasks(config.seed_tasks) if config.seed_tasks else []
    deduper = Deduper(config.similarity_threshold)
    deduper.add_all(seeds)
    counts: Counter[str] = Counter()
    for record in existing:  # an earlier run's lines are kept as they are, even if they now look alike
        deduper.add(record)
    if existing:
        logger.info("%s: %d records already there; generating %d more", out, len(existing), max(0, config.num_samples - len(existing)))
    kept = len(existing)
    if kept >= config.num_samples:
        return RunResult(0, len(existing), dict(counts))

    client = client if client is not None else openai_client(config.api_base, resolve_api_key(config.api_key), max_retries=0, timeout=config.request_timeout)
    limiter = limiter or SlidingWindowLimiter(config.requests_per_minute, 60.0)
    requester = Requester(client, config, limiter, sleep)
    # Different prompts on a rerun: the seed moves on with the number of records already there.
    rng = random.Random(config.seed * 1_000_003 + kept)
    rng_lock = threading.Lock()

    def one_request() -> str | None:
        with rng_lock:
            examples = rng.sample(seeds, min(config.seed_examples_per_request, len(seeds))) if seeds else None
            prompt = build_prompt(rng, config.records_per_request, config.language, examples)
        return requester.complete(prompt)

    out.parent.mkdir(parents=True, exist_ok=True)
    useless = 0
    bar = _progress(config.num_samples, kept, config.progress)
    with out.open("a", encoding="utf-8") as f, ThreadPoolExecutor(config.concurrency) as pool:
        pending: set[Future[str | None]] = set()
        try:
            while kept < config.num_samples:
                # no more requests in flight than the missing records need (1 missing record: 1 request)
                while len(pending) < config.concurrency and len(pending) * config.records_per_request < config.num_samples - kept:
                    pending.add(pool.submit(one_request))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    reply = future.result()
                    new = 0
                    if reply is None:
                        counts["failed requests"] += 1
                    else:
                        objects = parse_records(reply)
                        if not objects:
                            counts["replies with no JSON record"] += 1
                        for obj in objects:
                            record, why = to_alpaca(obj)
                            if record is None:
                                counts[f"invalid: {why}"] += 1
                                continue
                            if kept >= config.num_samples:
                                counts["beyond num_samples"] += 1
                                continue
                            dup = deduper.check(record)
                            if dup:
                                counts[dup] += 1
                                continue
                            deduper.add(record)
                            f.write(json.dumps(record, ensure_ascii=False) + "\n")
                            f.flush()
                            kept += 1
                            new += 1
                            bar.update(1)
                    useless = 0 if new else useless + 1
                    if useless >= config.max_useless_requests and requester.counts[NOT_JSON] >= useless:
                        raise UserError(
                            f"{config.api_base}: the last {useless} replies were not JSON ({_summary(counts | requester.counts)}); "
                            "check that --api_base is an OpenAI-compatible endpoint (a URL ending in /v1)"
                        )
                    if useless >= config.max_useless_requests:
                        raise UserError(
                            f"{config.api_base}: {useless} replies in a row gave no new record ({_summary(counts | requester.counts)}); "
                            "check --model, or raise --temperature for more variety"
                        )
        finally:
            for future in pending:
                future.cancel()
            bar.close()
    counts.update(requester.counts)
    counts["kept"] = kept - len(existing)
    logger.info("%s: %d records (%s)", out, kept, _summary(counts))
    return RunResult(kept - len(existing), len(existing), dict(counts))


def _summary(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="record", desc="self-instruct")
