"""Text generation: a causal language model, or a text encoder-decoder (T5, BART ...), fine-tuned to answer
prompts (instructions, summaries, chat). An encoder-decoder reads the prompt with its encoder and writes the
completion with its decoder (``Seq2SeqData``); the rest below holds for both.

Rows, one per example (JSONL, or CSV/Parquet of the same columns or through ``data.input_column``
/ ``data.target_column``):
    {"prompt": "...", "completion": "..."}             the loss is on the completion
    {"messages": [{"role": ..., "content": ...}, ...]}  the model's chat template; the loss is on the
                                                        last (assistant) message; ShareGPT's
                                                        {"conversations": [{"from", "value"}]} too
    {"instruction", "input", "output"}                 Alpaca's (Dolly's: context, response): the
                                                        prompt is the instruction, a blank line and
                                                        the input
    {"question": ..., "answer": ...} ...               the columns of well-known text-to-text sets
                                                        (KNOWN_PAIRS), read as prompt and completion
    {"text": "..."}                                    plain text; the loss is on all of it

Every target ends with the end-of-sequence token (checked before training), so the model learns
to stop; the prompt's tokens are masked out of the loss unless ``task.train_on_prompt``.
Validation measures loss and perplexity on every row and, on a fixed sample, the answers the
model generates (greedy, batched with left padding and a KV cache) against the references:
ROUGE-1/2/L (``rouge-score``) and exact match. The best checkpoint is chosen on ROUGE-L.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fmtune.data.readers import SPLIT_COLUMNS, jsonl_records, read_any
from fmtune.errors import ConfigError, DataError, ModelError, brief
from fmtune.tasks.base import TASKS, Task

ROLES = ("system", "user", "assistant")
ROUGE = ("rouge1", "rouge2", "rougeL")


@dataclass
class GenerationSettings:
    """How answers are generated when evaluating (the ``eval`` section of the config)."""
    max_new_tokens: int = 64
    samples: int = 48
    batch_size: int = 16


def _where(source: str, line: int, table: bool) -> str:
    return f"{source}: {'row' if table else 'line'} {line}"


def check_row(rec: dict[str, Any], where: str, input_col: str | None, target_col: str | None,
         with_targets: bool) -> dict[str, Any]:
    """One record as (kind, prompt, completion, messages), checked; ``pair``: the KNOWN_PAIRS it was read by."""
    pair, found = None, known_pair(rec, with_targets)
    if input_col or target_col:
        inp, tgt = input_col or "prompt", target_col or "completion"
        if inp not in rec:
            raise DataError(f"{where}: no {inp!r} (the input, data.input_column); keys: {', '.join(map(str, rec))}")
        prompt, completion = rec[inp], rec.get(tgt)
        if with_targets and tgt not in rec:
            raise DataError(f"{where}: no {tgt!r} (the target, data.target_column); keys: {', '.join(map(str, rec))}")
        kind, messages = "prompt", None
    elif "messages" in rec or "conversations" in rec:
        messages = rec["messages"] if "messages" in rec else _sharegpt(rec["conversations"], where)
        if hasattr(messages, "tolist"):  # a Parquet list cell
            messages = messages.tolist()
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise DataError(f"{where}: 'messages' is not a JSON list of {{role, content}}") from None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {j + 1} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {j + 1} has the unknown role {m['role']!r} "
                                f"(expected one of: {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {j + 1}: 'content' must be a string")
        completion = None
        if messages[-1]["role"] == "assistant":
            completion, messages = messages[-1]["content"], messages[:-1]
        elif with_targets:
            raise DataError(f"{where}: the last message must be the assistant's answer to train on "
                            f"(it is {messages[-1]['role']!r})")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: no user message before the answer")
        kind, prompt = "messages", None
    elif "instruction" in rec and ("output" in rec or "response" in rec or not with_targets):
        # Alpaca ({instruction, input, output}) and Dolly ({instruction, context, response}): the input
        # (context) follows the instruction after a blank line
        extra = rec.get("input", rec.get("context"))
        extra = "" if extra is None or (isinstance(extra, float) and math.isnan(extra)) else str(extra).strip()
        prompt = f"{rec['instruction']}\n\n{extra}" if extra else rec["instruction"]
        kind, completion, messages = "prompt", rec.get("output", rec.get("response")), None
    elif "prompt" in rec and ("completion" in rec or not found):
        kind, prompt, completion, messages = "prompt", rec["prompt"], rec.get("completion"), None
        if with_targets and "completion" not in rec:
            raise DataError(f"{where}: a 'prompt' without its 'completion'")
    elif found:
        pair = found
        kind, prompt, completion, messages = "prompt", rec[pair[0]], rec.get(pair[1]), None
    elif "text" in rec:
        kind, prompt, completion, messages = "text", "", rec["text"], None
    else:
        pairs = ", ".join(f"{a}/{b}" for a, b in KNOWN_PAIRS)
        raise DataError(f"{where}: expected {{\"prompt\", \"completion\"}}, {{\"messages\": [...]}}, "
                        f"{{\"instruction\", \"input\", \"output\"}}, {{\"text\"}} or one of the pairs {pairs} "
                        f"(or set data.input_column / data.target_column); keys: {', '.join(map(str, rec)) or 'none'}")
    if kind == "prompt" and not isinstance(prompt, str):
        if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
            raise DataError(f"{where}: empty prompt")
        prompt = str(prompt)
    if completion is not None and not isinstance(completion, str):
        completion = None if isinstance(completion, float) and math.isnan(completion) else str(completion)
    if with_targets and (completion is None or not completion.strip()):
        raise DataError(f"{where}: empty completion: there is nothing to learn from this row")
    return {"kind": kind, "prompt": prompt, "completion": completion,
            "messages": json.dumps(messages) if messages is not None else None, "pair": pair}


# The input and target columns of well-known text-to-text datasets, read as prompt and completion without
# data.input_column / data.target_column (the first pair a row holds both of; said before training)
KNOWN_PAIRS = (("question", "answer"),  # GSM8K and many question-answering sets
               ("query", "response"),  # MetaMathQA
               ("problem", "solution"),  # MATH
               ("inputs", "targets"),  # FLAN, xP3
               ("input", "output"), ("source", "target"), ("src", "tgt"), ("input_text", "target_text"),
               ("article", "highlights"),  # CNN / DailyMail
               ("document", "summary"),  # XSum
               ("dialogue", "summary"),  # SAMSum, DialogSum
               ("text", "summary"),  # BillSum and others: not plain text to continue
               ("prompt", "response"), ("prompt", "answer"), ("prompt", "output"))


def known_pair(keys: Any, with_targets: bool = True) -> tuple[str, str] | None:
    """The first of KNOWN_PAIRS whose input and target are both among ``keys`` (a row's keys or a
    table's columns); without targets (prompts to answer), the first whose input is there, other
    than ``text`` and ``prompt`` (plain text and prompts are read as such)."""
    keys = set(map(str, keys))
    for inp, tgt in KNOWN_PAIRS:
        if inp in keys and (tgt in keys or (not with_targets and inp not in ("text", "prompt"))):
            return inp, tgt
    return None


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROW_FORMATS = ("messages", "conversations", "instruction")  # a table holding one of these is read as its rows say


def _sharegpt(turns: Any, where: str) -> Any:
    """ShareGPT's ``conversations`` [{from: human / gpt / system, value}] as chat messages."""
    turns = turns.tolist() if hasattr(turns, "tolist") else turns
    if not isinstance(turns, list):
        return turns  # (refused as not a list by the caller)
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: conversations turn {j + 1} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(f"{where}: conversations turn {j + 1} is from {t['from']!r} (expected one of: "
                            f"{', '.join(SHAREGPT_ROLES)})")
        out.append({"role": role, "content": t["value"]})
    return out


def read_rows(path: str | Path, data_cfg: Any, with_targets: bool = True) -> pd.DataFrame:
    """A generation data file as rows of kind, prompt, completion, messages (JSON) and line (and a field naming each
    row's split, ``readers.SPLIT_COLUMNS``, as it is)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    source = str(path)
    records: list[tuple[int, dict[str, Any]]] = []
    read_as: set[tuple[str, str]] = set()  # the KNOWN_PAIRS read
    table = path.suffix.lower() not in (".jsonl", ".json")
    if not table and path.read_text(encoding=data_cfg.encoding, errors="replace").lstrip().startswith("["):
        try:  # a .json file holding one list of objects
            listed = json.loads(path.read_text(encoding=data_cfg.encoding))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: line {e.lineno}: not valid JSON ({e.msg})") from None
        for n, rec in enumerate(listed, 1):
            if not isinstance(rec, dict):
                raise DataError(f"{source}: item {n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
    elif not table:
        records = jsonl_records(path, path.read_text(encoding=data_cfg.encoding))
    else:
        df = read_any(path, data_cfg.encoding, data_cfg.input_column or data_cfg.text_column)
        records = [(int(i) + 1, r) for i, r in zip(df.index, df.to_dict("records"))]
        own = not (data_cfg.input_column or data_cfg.target_column or "prompt" in df.columns)
        pair = None if data_cfg.input_column or data_cfg.target_column or "completion" in df.columns or any(
            c in df.columns for c in ROW_FORMATS) else known_pair(df.columns, with_targets)
        if pair:
            data_cfg = _with_columns(data_cfg, *pair)
            read_as.add(pair)
        elif not (own and any(c in df.columns for c in ROW_FORMATS)):  # (else chat / Alpaca rows, as in JSONL)
            input_col = data_cfg.input_column or ("prompt" if "prompt" in df.columns else data_cfg.text_column)
            target_col = data_cfg.target_column or "completion"
            for col, key in ((input_col, "data.input_column"), (target_col, "data.target_column")):
                if col not in df.columns and (with_targets or key == "data.input_column"):
                    raise DataError(f"{source}: no column {col!r} ({key}); columns: "
                                    f"{', '.join(map(str, df.columns))}")
            data_cfg = _with_columns(data_cfg, input_col, target_col)
    if not records:
        raise DataError(f"{source}: no rows")
    rows = []
    for n, rec in records:
        row = check_row(rec, _where(source, n, table), data_cfg.input_column, data_cfg.target_column, with_targets)
        row["line"] = n
        row.update({k: v for k, v in rec.items() if isinstance(k, str) and k.strip().lower() in SPLIT_COLUMNS})
        rows.append(row)
        pair = row.pop("pair")
        if pair:
            read_as.add(pair)
    out = pd.DataFrame(rows)
    out.attrs["source"] = source
    out.attrs["table"] = table
    out.attrs["read_as"] = sorted(read_as)
    return out


def _with_columns(data_cfg: Any, input_col: str, target_col: str) -> Any:
    import dataclasses

    return dataclasses.replace(data_cfg, input_column=input_col, target_column=target_col)


# --- tokens ------------------------------------------------------------------------------------------

class LMData(torch.utils.data.Dataset):
    """Token ids of prompt + completion per example, and where the trained part starts.

    ``collate`` pads on the right (training and loss); the model is fed the positions whose next
    token is trained as ``target_index`` (flat into batch x length) and those next tokens as
    ``labels``. With ``packed`` set (``train.packing``, the training split), a batch is one row of
    its examples end to end with ``position_ids`` restarting at each: transformers then keeps
    attention within each example (its packed-sequence mask) and no token is padding.
    ``prompts`` / ``references`` are what generation is scored on."""

    def __init__(self, ids: list[list[int]], starts: list[int], pad_id: int, prompts: list[list[int]],
                 references: list[str | None], lines: list[int]):
        self.ids, self.starts, self.pad_id = ids, starts, pad_id
        self.prompts, self.references, self.lines = prompts, references, lines
        self.lengths = np.array([len(x) for x in ids])
        self.packed = False

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "start": self.starts[i]}

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        if self.packed:
            return self.collate_packed(idx)
        width = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        where, labels = [], []
        for b, i in enumerate(idx):
            ids = self.ids[i]
            input_ids[b, :len(ids)] = torch.tensor(ids)
            mask[b, :len(ids)] = 1
            first = max(self.starts[i], 1)  # position p predicts token p + 1
            where.extend(b * width + p - 1 for p in range(first, len(ids)))
            labels.extend(ids[first:])
        return {"input_ids": input_ids, "attention_mask": mask, "target_index": torch.tensor(where, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "prefix": torch.tensor(self.shared_prefix(idx))}

    def collate_packed(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ids, positions, where, labels = [], [], [], []
        for i in idx:
            row, offset = self.ids[i], len(ids)
            ids.extend(row)
            positions.extend(range(len(row)))
            first = max(self.starts[i], 1)  # position p predicts token p + 1, within the example
            where.extend(offset + p - 1 for p in range(first, len(row)))
            labels.extend(row[first:])
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([positions]),
                "target_index": torch.tensor(where, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}

    def shared_prefix(self, idx: list[int]) -> int:
        """How many leading tokens every row of the batch has in common (the chat template, a system
        prompt, an instruction), leaving each row at least one token of its own."""
        rows = [self.ids[i] for i in idx]
        limit = min(len(r) for r in rows) - 1
        first = rows[0]
        n = 0
        while n < limit and all(r[n] == first[n] for r in rows[1:]):
            n += 1
        return n


class Seq2SeqData(torch.utils.data.Dataset):
    """An encoder-decoder's examples (T5, BART ...): the prompt's tokens, the encoder's input, and the completion's
    ending with the EOS, the decoder's targets. ``collate`` pads both on the right; the decoder is fed the targets
    shifted right after its start token (``decoder_input_ids``), and every target position is trained
    (``target_index``, flat into batch x decoder length). ``prompts`` / ``references``: what generation is scored
    on."""

    packed = False  # (train.packing is refused for encoder-decoders: causal_lm.check_packing)

    def __init__(self, prompts: list[list[int]], targets: list[list[int]], start: int, pad_id: int,
                 references: list[str | None], lines: list[int]):
        self.prompts, self.targets, self.start, self.pad_id = prompts, targets, start, pad_id
        self.references, self.lines = references, lines
        self.lengths = np.array([len(p) + len(t) for p, t in zip(prompts, targets)])

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.prompts[i], "labels": self.targets[i]}

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(max(len(self.prompts[i]) for i in idx), 1)
        dwidth = max(max(len(self.targets[i]) for i in idx), 1)
        out = {"input_ids": torch.full((len(idx), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(idx), width), dtype=torch.long),
               "decoder_input_ids": torch.full((len(idx), dwidth), self.pad_id, dtype=torch.long),
               "decoder_attention_mask": torch.zeros((len(idx), dwidth), dtype=torch.long)}
        where, labels = [], []
        for b, i in enumerate(idx):
            p, t = self.prompts[i], self.targets[i]
            out["input_ids"][b, :len(p)] = torch.tensor(p, dtype=torch.long)
            out["attention_mask"][b, :len(p)] = 1
            shifted = [self.start, *t[:-1]] if t else [self.start]
            out["decoder_input_ids"][b, :len(shifted)] = torch.tensor(shifted, dtype=torch.long)
            out["decoder_attention_mask"][b, :len(shifted)] = 1
            where.extend(b * dwidth + q for q in range(len(t)))
            labels.extend(t)
        return {**out, "target_index": torch.tensor(where, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}


def uses_template(tokenizer: Any, setting: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise ConfigError("task.chat_template: on, but this tokenizer has no chat template")
    return has if setting == "auto" else setting == "on"


def prompt_ids(tokenizer: Any, row: dict[str, Any], instruction: str | None, template: bool,
               chats: bool = True) -> list[int]:
    """The tokens of a row's prompt, as the model is asked at training and generation time. The
    instruction goes before a prompt, and before a chat's first user turn, so that a chat of one
    user turn asks what the same text as a prompt asks (the same tokens under a chat template).
    Without a chat template, a chat is written out as "role: content" lines, except that one user
    turn is asked as the bare prompt when the run did not learn chats (``chats`` false)."""
    if row["kind"] == "text":
        bos = tokenizer.bos_token_id
        return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    messages = json.loads(row["messages"]) if row["kind"] == "messages" else None
    if messages is not None and not template and not chats and len(messages) == 1 and messages[0]["role"] == "user":
        messages, row = None, {"kind": "prompt", "prompt": messages[0]["content"]}
    if messages is not None:
        if instruction:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = [{**m, "content": f"{instruction}\n\n{m['content']}"} if i == first else m
                        for i, m in enumerate(messages)]
        if not template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return tokenizer(text)["input_ids"]
    else:
        text = f"{instruction}\n\n{row['prompt']}" if instruction else row["prompt"]
        if not template:
            return tokenizer(text)["input_ids"]
        messages = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@TASKS.register("generation")
class Generation(Task):
    name = "generation"
    level = "lm"  # a causal language model and its own output layer (fmtune.models.causal_lm)
    default_metric = "rougeL"
    metric_names = ("rougeL", "rouge1", "rouge2", "exact_match", "loss", "perplexity")
    # batches of 8 (TRL's default too): 200 Debian package descriptions -> synopsis, LoRA, one epoch: 25 steps of
    # 8 took test ROUGE-L 0.215 -> 0.277; 7 steps of 32 stayed below the pretrained model on validation. A batch
    # of 32 long rows also holds 4x the activations (720 tokens x 32 rows: about 63 GiB without checkpointing).
    default_train = {"batch_size": 8}
    capabilities = frozenset({"robustness"})  # (prompts with typos, dropped / swapped words, changed case: ROUGE-L)
    description = ("generate text: fine-tune a causal language model (or a T5/BART-like encoder-decoder) on prompt "
                   "-> completion pairs, chat messages or plain text (loss on the completion; ROUGE-L picks the best "
                   "checkpoint)")
    baseline_method = "the pretrained model prompted the same way, before fine-tuning (zero-shot)"
    input_name = "prompt"  # what each answer in test_answers.jsonl answers

    def __init__(self, labels: list[str] | None = None, **kw: Any):
        super().__init__([], **{k: v for k, v in kw.items() if k in ("threshold", "separator", "target_stats")})
        self.instruction = kw.get("instruction")
        self.train_on_prompt = bool(kw.get("train_on_prompt", False))
        self.chat_template = kw.get("chat_template", "auto")
        self.truncate = bool(kw.get("truncate", False))
        # whether the training rows held chats (how a one-turn chat is asked without a chat template, prompt_ids)
        self.chats = bool(kw.get("chats", False))
        self.options = {"instruction": self.instruction, "train_on_prompt": self.train_on_prompt,
                        "chat_template": self.chat_template, "truncate": self.truncate, "chats": self.chats}
        self.settings = GenerationSettings()
        self.last_answers: list[str] = []  # of the latest evaluation's sample

    def greater_is_better(self, metric: str) -> bool:
        return metric not in ("loss", "perplexity")

    @classmethod
    def read_file(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        return read_rows(path, data_cfg)

    @classmethod
    def target_column(cls, data_cfg: Any) -> str:
        return "completion"

    @classmethod
    def options_from(cls, task_cfg: Any, data_cfg: Any) -> dict[str, Any]:
        return {"instruction": task_cfg.instruction, "train_on_prompt": task_cfg.train_on_prompt,
                "chat_template": task_cfg.chat_template, "truncate": task_cfg.truncate}

    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, **kw: Any) -> Generation:
        return cls(**kw, chats=bool((df["kind"] == "messages").any()))

    # --- data -----------------------------------------------------------------------------------
    def dataset(self, df: pd.DataFrame, bundle: Any, data_cfg: Any, with_targets: bool = True,
                allow_unknown: bool = False) -> tuple[LMData | Seq2SeqData, np.ndarray]:
        from fmtune.models.wrapped import encoder_decoder

        if encoder_decoder(bundle.model):
            return self.seq2seq_dataset(df, bundle, with_targets), np.arange(len(df))
        tok = bundle.tokenizer
        template = uses_template(tok, self.chat_template)
        eos, limit = tok.eos_token_id, bundle.max_length
        source, table = df.attrs.get("source", "data"), df.attrs.get("table", False)
        ids, starts, prompts, refs, cut = [], [], [], [], 0
        for row in df.to_dict("records"):
            where = _where(source, row["line"], table)
            p = prompt_ids(tok, row, self.instruction, template, self.chats)
            c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [eos] if row["completion"] else []
            if with_targets and len(p) + len(c) > limit:
                if not self.truncate:
                    raise DataError(f"{where}: {len(p)} prompt + {len(c)} completion tokens is more than "
                                    f"model.max_length {limit}; raise model.max_length (up to the model's context) "
                                    "or set task.truncate=true to cut the prompt's start (then the completion's end)")
                cut += 1
                keep = max(limit - len(c), 0)
                p = p[len(p) - keep:] if keep else []
                c = c[:limit - len(p)]
            if with_targets and row["kind"] != "text" and (not c or c[-1] != eos) and not self.truncate:
                raise DataError(f"internal: {where}: the target does not end with the end-of-sequence token")
            prompts.append(p[-(limit - 1):] if len(p) >= limit else p)
            full = p + c
            starts.append(1 if self.train_on_prompt or row["kind"] == "text" else len(p))
            ids.append(full if with_targets else p)
            refs.append(row["completion"])
        if cut:
            warnings.warn(f"{source}: {cut} example(s) longer than model.max_length {limit} were truncated "
                          "(task.truncate)", UserWarning, stacklevel=2)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        lines = [int(x) for x in df["line"]]
        return LMData(ids, starts, pad, prompts, refs, lines), np.arange(len(df))

    def seq2seq_dataset(self, df: pd.DataFrame, bundle: Any, with_targets: bool) -> Seq2SeqData:
        """The rows as an encoder-decoder reads them: the prompt (with the instruction; a chat as "role: content"
        lines, or its chat template) into the encoder, the completion and its EOS out of the decoder, each within
        model.max_length tokens (task.truncate: a prompt loses its end, as a summariser's article does, and keeps its
        closing special token; a completion its end)."""
        from fmtune.models.wrapped import decoder_start

        tok = bundle.tokenizer
        template = uses_template(tok, self.chat_template)
        eos, limit = tok.eos_token_id, bundle.max_length
        source, table = df.attrs.get("source", "data"), df.attrs.get("table", False)
        if self.train_on_prompt:
            raise ConfigError("task.train_on_prompt: an encoder-decoder reads the prompt with its encoder and never "
                              "writes it; leave task.train_on_prompt off")
        prompts, targets, refs, cut = [], [], [], 0
        start = decoder_start(bundle.model)
        for row in df.to_dict("records"):
            where = _where(source, row["line"], table)
            if row["kind"] == "text":
                raise DataError(f"{where}: a plain {{\"text\"}} row is text to continue, which a causal LM learns; "
                                f"{bundle.source} is an encoder-decoder: give each row a prompt (its input) and a "
                                "completion (data.input_column / data.target_column)")
            p = prompt_ids(tok, row, self.instruction, template, self.chats)
            # (as a target: Marian's own target vocabulary, mBART's and NLLB's target-language code)
            t = tok(text_target=row["completion"])["input_ids"] if with_targets else []
            if t and t[0] == start:  # a BERT tokenizer's [CLS], the decoder's start token already (bert2bert): once
                t = t[1:]  # (twice, a short run learnt to repeat it: 10 of 12 answer tokens [CLS])
            if with_targets and (not t or t[-1] != eos):  # (tokenizers that add no EOS: T5's does, BART's too)
                t.append(eos)
            if len(p) > limit or len(t) > limit:
                if not self.truncate:
                    longer = "the prompt" if len(p) > limit else "the completion"
                    raise DataError(f"{where}: {len(p)} prompt tokens and {len(t)} completion tokens: more than "
                                    f"model.max_length {limit} for {longer}; raise model.max_length or set "
                                    "task.truncate=true to cut the end of what is longer")
                cut += 1
                p, t = fit_prompt(p, limit, tok), t[:limit]
            prompts.append(p)
            targets.append(t)
            refs.append(row["completion"])
        if cut:
            warnings.warn(f"{source}: {cut} example(s) longer than model.max_length {limit} were truncated "
                          "(task.truncate)", UserWarning, stacklevel=3)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return Seq2SeqData(prompts, targets, start, pad, refs, [int(x) for x in df["line"]])

    # --- loss and metrics -------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: Any, weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def evaluate_model(self, net: Any, ds: LMData, batch_size: int, device: Any,
                       sample: list[int] | None = None, progress: Any = None) -> dict[str, float]:
        """Loss and perplexity over every row; ROUGE and exact match of greedy answers to the
        fixed sample of rows (``sample``; default: the first ``settings.samples`` of a seeded order)."""
        model = net.model
        was_training = model.training
        model.eval()
        out = token_loss(net, ds, token_batches(ds.lengths, batch_size), device)
        sample = self.sample(ds) if sample is None else sample
        if sample:
            answers = generate(model, net.tokenizer, [ds.prompts[i] for i in sample], self.settings, device,
                               on_batch=progress)
            self.last_answers = answers
            out.update(score(answers, [ds.references[i] for i in sample]))
        if was_training:
            model.train()
        return out

    def sample(self, ds: LMData, n: int | None = None) -> list[int]:
        return fixed_sample(ds.references, self.settings.samples if n is None else n)

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "labels": [], **self.options}


TOKENS_PER_BATCH = 4096


def fit_prompt(ids: list[int], limit: int, tokenizer: Any, encoder_decoder: bool = True) -> list[int]:
    """A prompt of at most ``limit`` tokens: an encoder's input loses its end but keeps its closing special token
    (T5's and BART's EOS); a causal LM's its start (the end is what the answer follows)."""
    if len(ids) <= limit:
        return ids
    if not encoder_decoder:
        return ids[len(ids) - limit:]
    if ids[-1] in tokenizer.all_special_ids and limit > 1:
        return ids[:limit - 1] + ids[-1:]
    return ids[:limit]


def token_loss(net: Any, ds: Any, batches: list[list[int]], device: Any) -> dict[str, float]:
    """Mean cross-entropy over every trained token of ``ds`` (``net`` gives the logits of the
    positions in each batch's ``target_index``), and its perplexity."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for idx in batches:
            batch = {k: v.to(device) for k, v in ds.collate(idx).items()}
            labels = batch.pop("labels")
            if not len(labels):
                continue
            total += float(F.cross_entropy(net(**batch).logits.float(), labels, reduction="sum"))
            count += len(labels)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}


def fixed_sample(references: list[str | None], n: int) -> list[int]:
    """A fixed, seeded sample of ``n`` rows with a reference (the same at every evaluation)."""
    rows = [i for i, r in enumerate(references) if r]
    if len(rows) <= n:
        return rows
    rng = np.random.default_rng(0)
    return sorted(rng.choice(rows, size=n, replace=False).tolist())


def token_batches(lengths: np.ndarray, max_rows: int, max_tokens: int = TOKENS_PER_BATCH) -> list[list[int]]:
    """Rows sorted by length, cut into batches of at most ``max_rows`` rows and ``max_tokens``
    tokens once padded. Evaluation and generation read whole splits at once: one batch of every
    row would pad each to the longest (measured on SmolLM2: a padded prefill costs as much as the
    tokens it pads, and dominates generation on a CPU)."""
    order = np.argsort(lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= max_rows or (len(current) + 1) * int(lengths[i]) > max_tokens):
            batches.append(current)
            current = []
        current.append(int(i))
    if current:
        batches.append(current)
    return batches


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (stemmed, as rouge-score computes it) and exact match (stripped, case kept)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    totals = dict.fromkeys(ROUGE, 0.0)
    exact = 0
    for a, r in zip(answers, references):
        s = scorer.score(r, a)
        for k in ROUGE:
            totals[k] += s[k].fmeasure
        exact += int(a.strip() == r.strip())
    n = max(len(answers), 1)
    return {**{k: v / n for k, v in totals.items()}, "exact_match": exact / n}


# Below this temperature an answer is decoded greedily (what it tends to): dividing the logits by a temperature of
# 1e-165 makes them infinite and the sampling probabilities NaN (found by the service's schema fuzz; vLLM uses 1e-5)
MIN_TEMPERATURE = 1e-5


def generation_config(tokenizer: Any, max_new_tokens: int, model: Any = None) -> Any:
    """How answers are decoded: the most likely token each step (a sampled row's token is drawn before that, by
    ``RowSampler``), stop at the tokenizer's EOS, the KV cache on. One candidate, no minimum length and no n-gram or
    repetition rule, whatever the model's own generation_config.json asks (BART-large-CNN's: 4 beams, at least 56
    tokens): what the scores measure is the model. An encoder-decoder's decoder starts from its own start token
    (``model``: the model that generates)."""
    from transformers import GenerationConfig

    from fmtune.models.wrapped import decoder_start, encoder_decoder

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    extra = {"decoder_start_token_id": decoder_start(model)} if model is not None and encoder_decoder(model) else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                            use_cache=True, num_beams=1, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0,
                            **extra)


def sampled(options: dict[str, Any] | None) -> bool:
    """Whether decoding ``options`` (temperature, top_p, seed) sample: a temperature of at least MIN_TEMPERATURE."""
    return bool(options and (options.get("temperature") or 0) >= MIN_TEMPERATURE)


class RowSampler:
    """A logits processor that samples each sampled row of a batch with its own temperature, top_p and seed (a
    ``torch.Generator`` per row): the drawn token is left the only one possible, which the greedy step then takes.
    So a row's answer depends on its seed, not on what else is decoded beside it (transformers' own sampling draws
    the whole batch from one generator), and sampled and greedy rows share a batch (``options`` None: greedy)."""

    def __init__(self, options: list[dict[str, Any] | None]):
        self.rows = [(float(o["temperature"]), float(o.get("top_p", 1.0)),
                      torch.Generator().manual_seed(int(o.get("seed", 0)))) if sampled(o) else None for o in options]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            temperature, top_p, generator = row
            probs = torch.softmax(scores[b].float().cpu() / temperature, -1)
            if top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p (at least one)
                ranked, order = probs.sort(descending=True)
                cut = int((ranked.cumsum(0) < top_p).sum()) + 1
                keep = torch.zeros_like(probs)
                keep[order[:cut]] = ranked[:cut]
                probs = keep
            token = int(torch.multinomial(probs, 1, generator=generator))
            scores[b] = float("-inf")
            scores[b, token] = 0.0
        return scores


@dataclass
class Completion:
    """One decoded answer: its text, how many new tokens were decoded (the EOS not counted) and
    whether it ended at the EOS (False: it stopped at max_new_tokens)."""
    text: str
    tokens: int
    stopped: bool


def new_tokens(row: torch.Tensor, eos: int | None, pad: int | None) -> tuple[int, bool]:
    """(tokens decoded before the EOS, whether the EOS came) of one row of ``generate_new``'s output:
    after its EOS a row of a batch is padded to the longest."""
    ids = row.tolist()
    if eos is not None and eos in ids:
        return ids.index(eos), True
    return (sum(t != pad for t in ids) if pad is not None else len(ids)), False


class StreamSink:
    """Where one prompt's answer goes while its batch is decoded (``complete(..., sinks=...)``): ``put(text)`` gets
    each new piece of text as transformers' ``TextStreamer`` cuts it (whole words, a line at its end); the prompt's
    row stops decoding at the next token once ``closed`` or the caller's ``cancel`` (``threading.Event``) is set."""

    def __init__(self, put: Any, cancel: Any = None):
        import threading

        self.put, self.cancel, self.closed = put, cancel, threading.Event()

    def stopped(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())


class QueuedStream:
    """One streamed answer handed from the thread that decodes it to the one that reads it: ``sink`` goes to
    ``complete``, ``done()`` once its decoding is over (ended or failed), ``pieces()`` yields the text until then
    (closing it early closes the sink: its row stops at the next token)."""

    END = object()

    def __init__(self, cancel: Any = None):
        import queue

        self.queue: queue.Queue = queue.Queue()
        self.sink = StreamSink(self.queue.put, cancel)

    def done(self, *_: Any) -> None:
        self.queue.put(self.END)

    def pieces(self) -> Any:
        try:
            while (piece := self.queue.get()) is not self.END:
                yield piece
        finally:
            self.sink.closed.set()


class _BatchStreamer:
    """A transformers streamer for a batch being decoded: each row with a sink gets its own ``TextStreamer``
    (skip the prompt, skip special tokens: as a stream of one prompt), fed its row's tokens until its EOS."""

    def __init__(self, tokenizer: Any, sinks: list[StreamSink | None], eos: int | None):
        from transformers import TextStreamer

        class Row(TextStreamer):
            def __init__(self, sink: StreamSink):
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
                self.sink = sink

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    self.sink.put(text)

        self.rows = [Row(s) if s is not None else None for s in sinks]
        self.done = [r is None for r in self.rows]
        self.eos, self.prompt = eos, True

    def put(self, value: torch.Tensor) -> None:
        value = value.reshape(len(self.rows), -1)  # the prompts (B, L) first, then a token per row (B,)
        for b, row in enumerate(self.rows):
            if self.done[b]:
                continue
            if not self.prompt and (int(value[b, -1]) == self.eos or row.sink.stopped()):
                self.done[b] = True  # (after its EOS a row is padded; a stopped one's text goes nowhere)
                row.end()
                continue
            row.put(value[b])
        self.prompt = False

    def end(self) -> None:
        for b, row in enumerate(self.rows):
            if not self.done[b]:
                self.done[b] = True
                row.end()


def _stopped_rows(sinks: list[StreamSink | None]) -> Any:
    """A stopping criterion: the rows whose sink is closed or cancelled stop at the next token."""
    from transformers import StoppingCriteria

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            return torch.tensor([s is not None and s.stopped() for s in sinks], device=input_ids.device)

    return Stopped()


def complete(model: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings, device: Any,
             sampling: list[dict[str, Any] | None] | None = None, on_batch: Any = None,
             sinks: list[StreamSink | None] | None = None) -> list[Completion]:
    """Answers to token-id prompts: batches of similar length, padded on the left (an encoder-decoder's
    encoder: on the right), decoded with the KV cache (``model.generate``); greedy unless ``sampling`` gives a
    prompt its temperature, top_p and seed (``RowSampler``; None: greedy). Returns each prompt's answer (new text,
    tokens, whether it ended at the EOS), in order. ``sinks`` (one per prompt, None for those not streamed): each
    streamed prompt's text goes to its sink while the batch is decoded, and a closed sink stops its row (the
    others go on)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from fmtune.models.wrapped import encoder_decoder, generate_new

    gen = generation_config(tokenizer, settings.max_new_tokens, model)
    eos, pad = gen.eos_token_id, gen.pad_token_id
    right = encoder_decoder(model)
    answers: list[Completion] = [Completion("", 0, False)] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for idx in token_batches(np.array([max(len(p), 1) for p in prompts]), settings.batch_size):
            width = max(max(len(prompts[i]) for i in idx), 1)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                p = prompts[i] or [eos]
                at = slice(0, len(p)) if right else slice(width - len(p), width)
                ids[b, at] = torch.tensor(p)
                mask[b, at] = 1
            extra: dict[str, Any] = {}
            if sampling is not None and any(sampled(sampling[i]) for i in idx):
                extra["logits_processor"] = LogitsProcessorList([RowSampler([sampling[i] for i in idx])])
            if sinks is not None and any(sinks[i] is not None for i in idx):
                rows = [sinks[i] for i in idx]
                extra |= {"streamer": _BatchStreamer(tokenizer, rows, eos),
                          "stopping_criteria": StoppingCriteriaList([_stopped_rows(rows)])}
            try:
                out = generate_new(model, ids.to(device), mask.to(device), generation_config=gen, **extra)
            except torch.OutOfMemoryError:
                raise
            except (IndexError, ValueError, RuntimeError, TypeError) as e:
                kind = getattr(getattr(model, "config", None), "model_type", "?")
                raise ModelError(f"transformers' generate fails on this {kind} model ({type(e).__name__}: "
                                 f"{brief(e)}); fmtune decodes through it, so this model cannot answer here (its "
                                 "transformers version may be the cause)") from e
            for b, i in enumerate(idx):
                text = tokenizer.decode(out[b], skip_special_tokens=True).strip()
                answers[i] = Completion(text, *new_tokens(out[b], eos, pad))
            if on_batch is not None:
                on_batch(len(idx))
    return answers


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings, device: Any,
             sampling: list[dict[str, Any] | None] | None = None, on_batch: Any = None) -> list[str]:
    """The texts of ``complete``: each prompt's decoded new text, in order."""
    return [c.text for c in complete(model, tokenizer, prompts, settings, device, sampling, on_batch)]
