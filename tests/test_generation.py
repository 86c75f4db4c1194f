"""Text generation (--task generation): readers and their errors, prompt masking and EOS, the
logits of the target positions, batched generation with left padding, training end to end on a
tiny random-init Llama with a BPE tokenizer trained here, generate, export --merge."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from fmtune import api, config
from fmtune.data.readers import read_table
from fmtune.errors import ConfigError, DataError, ModelError
from fmtune.tasks.generation import GenerationSettings, StreamSink, generate, read_rows

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "red green blue cat dog bird one two three four five six seven eight nine ten".split()


def repeat_rows(n: int, seed: int) -> list[dict]:
    """Prompt 'repeat: w1 w2 ...' -> completion 'w1 w2 ...': learnable by a tiny model in seconds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        out.append({"prompt": f"repeat: {words}", "completion": words})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer, a chat template and pad == eos
    (as SmolLM2 ships it), saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                   "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["prompt"] + " " + r["completion"] for r in repeat_rows(500, 0)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<unk>", pad_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                      pad_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def gen_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen-data")
    return {"train": write_jsonl(d / "train.jsonl", repeat_rows(160, 1)),
            "test": write_jsonl(d / "test.jsonl", repeat_rows(24, 2))}


def gen_cfg(model: Path, train_file: Path, out: Path, **sections) -> config.Config:
    data = {"model": {"name": str(model)}, "task": {"type": "generation"}, "data": {"train": str(train_file)},
            "out": str(out), "eval": {"max_new_tokens": 12, "samples": 16},
            "train": {"epochs": 2, "batch_size": 16, "seed": 0}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    return config.from_dict(data)


def train_silently(cfg: config.Config, **kw) -> dict:
    """``api.train`` quietly, warnings silenced (a tiny model's runs warn of what does not matter here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return api.train(cfg, quiet=True, **kw)


def data_cfg(**kw):
    return config.from_dict({"data": kw}).data


# --- reading ---------------------------------------------------------------------------------------

def test_the_three_row_shapes_and_a_table_are_read(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "plain"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", rows), data_cfg())
    assert df["kind"].tolist() == ["prompt", "text", "messages"]
    assert df["completion"].tolist() == ["c", "plain", "a"]
    assert json.loads(df["messages"][2])[-1] == {"role": "user", "content": "u"}  # the answer is the target
    (tmp_path / "list.json").write_text(json.dumps(rows))  # a .json file of one list
    assert read_rows(tmp_path / "list.json", data_cfg())["completion"].tolist() == ["c", "plain", "a"]
    pd.DataFrame({"body": ["x = 1", "y = 2"], "summary": ["sets x", "sets y"]}).to_csv(tmp_path / "t.csv", index=False)
    t = read_rows(tmp_path / "t.csv", data_cfg(input_column="body", target_column="summary"))
    assert t["prompt"].tolist() == ["x = 1", "y = 2"] and t["completion"].tolist() == ["sets x", "sets y"]


def test_hub_layouts_alpaca_dolly_sharegpt_and_parquet_chats_are_read(tmp_path):
    """What instruction sets on the Hugging Face Hub hold: Alpaca and Dolly rows, ShareGPT turns,
    and chats stored in Parquet (a list column), each read without settings."""
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hello"},
            {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    df = read_rows(write_jsonl(tmp_path / "hub.jsonl", rows), data_cfg())
    assert df["prompt"].tolist()[:3] == ["Add.\n\n2 and 3", "Greet.", "Summarise.\n\nA long text."]
    assert df["completion"].tolist() == ["5", "Hello", "Short.", "hello"]
    assert json.loads(df["messages"][3]) == [{"role": "user", "content": "hi"}]
    chats = pd.DataFrame({"messages": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]]})
    chats.to_parquet(tmp_path / "chats.parquet")
    parquet = read_rows(tmp_path / "chats.parquet", data_cfg())
    assert parquet["kind"].tolist() == ["messages"] and parquet["completion"].tolist() == ["a"]
    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "alpaca.parquet")
    assert read_rows(tmp_path / "alpaca.parquet", data_cfg())["prompt"].tolist() == ["Add.\n\n2 and 3", "Greet."]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match="bad.jsonl: line 1: conversations turn 1 is from 'bot'"):
        read_rows(bad, data_cfg())


def test_line_aligned_source_and_target_files_are_read_as_pairs(tmp_path):
    """Seq2seq sets as Hugging Face's summarisation examples ship them (train.source beside train.target, one
    example a line; .src / .tgt too) were refused ("unsupported file type '.source'"). Now each line of the source
    is a prompt and the same line of the target its completion; files of unequal lines are an error naming both; a
    source alone is prompts to answer."""
    (tmp_path / "train.source").write_text("A long article about cats.\nAnother article.\n")
    (tmp_path / "train.target").write_text("Cats.\nAnother.\n\n")
    df = read_rows(tmp_path / "train.source", data_cfg())
    assert df["prompt"].tolist() == ["A long article about cats.", "Another article."]
    assert df["completion"].tolist() == ["Cats.", "Another."]
    (tmp_path / "val.src").write_text("x\ny\n")
    (tmp_path / "val.tgt").write_text("x\n")
    with pytest.raises(DataError, match=r"val.src has 2 lines and .*val.tgt 1: line-aligned files"):
        read_rows(tmp_path / "val.src", data_cfg())
    (tmp_path / "new.source").write_text("Summarise me.\n")
    from fmtune.paths import looks_like_path

    assert read_table(tmp_path / "new.source")["text"].tolist() == ["Summarise me."] and looks_like_path("a.source")


def test_well_known_text_to_text_columns_are_read_without_settings(tmp_path):
    """GSM8K's question/answer, BillSum's text/summary (not plain text to continue), CNN/DailyMail's
    article/highlights in a table, prompt/response ...; the pairs read are recorded (the plan says them);
    prompts to answer are read by the input alone; a row of none of them names the pairs."""
    rows = [{"question": "2+2?", "answer": "4"}, {"text": "A bill.", "summary": "Short.", "title": "T"},
            {"prompt": "p", "response": "r"}, {"prompt": "p2", "completion": "c2", "answer": "not this"},
            {"text": "plain text"}]
    df = read_rows(write_jsonl(tmp_path / "pairs.jsonl", rows), data_cfg())
    assert df["kind"].tolist() == ["prompt"] * 4 + ["text"]
    assert df["prompt"].tolist()[:4] == ["2+2?", "A bill.", "p", "p2"]
    assert df["completion"].tolist() == ["4", "Short.", "r", "c2", "plain text"]
    assert df.attrs["read_as"] == [("prompt", "response"), ("question", "answer"), ("text", "summary")]
    pd.DataFrame({"id": [1, 2], "article": ["Long news.", "More news."], "highlights": ["News.", "More."]}).to_csv(
        tmp_path / "cnn.csv", index=False)
    t = read_rows(tmp_path / "cnn.csv", data_cfg())
    assert t["prompt"].tolist() == ["Long news.", "More news."] and t["completion"].tolist() == ["News.", "More."]
    assert t.attrs["read_as"] == [("article", "highlights")]
    asked = read_rows(write_jsonl(tmp_path / "ask.jsonl", [{"question": "3+3?"}, {"prompt": "p"}]), data_cfg(),
                      with_targets=False)
    assert asked["prompt"].tolist() == ["3+3?", "p"]
    pd.DataFrame({"question": ["5+5?"]}).to_csv(tmp_path / "ask.csv", index=False)
    assert read_rows(tmp_path / "ask.csv", data_cfg(), with_targets=False)["prompt"].tolist() == ["5+5?"]
    with pytest.raises(DataError, match=r"line 1: expected .* or one of the pairs question/answer, .*keys: foo, bar"):
        read_rows(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}]), data_cfg())


@pytest.mark.parametrize("line, match", [
    ({"prompt": "p"}, "line 2: a 'prompt' without its 'completion'"),
    ({"prompt": "p", "completion": "  "}, "line 2: empty completion"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "line 2: message 1 has the unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "line 2: the last message must be the assistant's"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "line 2: no user message"),
    ({"question": "q"}, "line 2: expected .*keys: question"),  # (a question without its answer)
])
def test_a_bad_row_is_an_error_naming_file_and_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, line])
    with pytest.raises(DataError, match=match):
        read_rows(path, data_cfg())


def test_broken_json_and_a_missing_table_column_are_named(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="b.jsonl: line 2 is not valid JSON"):
        read_rows(tmp_path / "b.jsonl", data_cfg())
    pd.DataFrame({"text": ["a"], "label": ["b"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="no column 'completion' \\(data.target_column\\)"):
        read_rows(tmp_path / "t.csv", data_cfg())


# --- tokens, masking, EOS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(tiny_llama):
    from fmtune.models import build
    from fmtune.tasks.generation import Generation

    task = Generation()
    return build.create(config.from_dict({"model": {"name": str(tiny_llama)}}).model, task), task


def test_pad_is_not_eos_and_only_the_completion_and_its_eos_are_trained(lm, tmp_path):
    bundle, task = lm
    tok = bundle.tokenizer
    assert tok.pad_token_id != tok.eos_token_id  # shipped equal, as SmolLM2's: the model could never learn to stop
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "repeat: red", "completion": "red"}]), data_cfg())
    ds, _ = task.dataset(df, bundle, data_cfg())
    batch = ds.collate([0])
    completion = tok("red", add_special_tokens=False)["input_ids"]
    assert batch["labels"].tolist() == completion + [tok.eos_token_id]
    ids = batch["input_ids"][0]
    assert ids[batch["target_index"] + 1].tolist() == batch["labels"].tolist()  # position p predicts p + 1
    prompt = tok.apply_chat_template([{"role": "user", "content": "repeat: red"}], add_generation_prompt=True,
                                     tokenize=False)
    assert tok.decode(ids[:len(ids) - len(completion) - 1]) == prompt
    task_all = type(task)(train_on_prompt=True)
    assert len(task_all.dataset(df, bundle, data_cfg())[0].collate([0])["labels"]) == len(ids) - 1


def test_the_instruction_goes_before_a_prompt_and_before_a_chats_first_user_turn(lm, tmp_path):
    """A one-turn chat asks what the same text as a prompt asks, with the run's instruction, in training and in
    serving alike; without a chat template a chat is written as role lines, and one user turn is asked as the bare
    prompt by a run that learned no chats."""
    from fmtune.tasks.generation import prompt_ids

    tok = lm[0].tokenizer
    prompt = {"kind": "prompt", "prompt": "repeat: red", "messages": None}

    def chat(*turns: tuple[str, str]) -> dict:
        messages = [{"role": r, "content": c} for r, c in turns]
        return {"kind": "messages", "prompt": None, "messages": json.dumps(messages)}

    one = chat(("user", "repeat: red"))
    for instruction in (None, "Say it again."):
        for template in (True, False):
            assert prompt_ids(tok, one, instruction, template, chats=False) == prompt_ids(tok, prompt, instruction,
                                                                                        template)
    said = tok.decode(prompt_ids(tok, one, "Say it again.", True))
    assert "Say it again.\n\nrepeat: red" in said and said.count("Say it again.") == 1
    two = tok.decode(prompt_ids(tok, chat(("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c")),
                                "Say it again.", True))
    assert "Say it again.\n\na" in two and "Say it again.\n\nc" not in two and "Be brief." in two
    assert tok.decode(prompt_ids(tok, one, "Say it again.", False, chats=True)) == (
        "user: Say it again.\n\nrepeat: red\nassistant: ")
    rows = read_rows(write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                                       {"role": "assistant", "content": "y"}]}]),
                     data_cfg())
    assert type(lm[1]).from_train(rows["completion"], rows).options["chats"] is True
    plain = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "completion": "y"}]), data_cfg())
    assert type(lm[1]).from_train(plain["completion"], plain).options["chats"] is False


def test_too_long_examples_are_an_error_or_truncated_with_a_warning(lm, tmp_path):
    bundle, task = lm
    long = {"prompt": "repeat: " + "red " * 300, "completion": "red"}
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", [long]), data_cfg())
    with pytest.raises(DataError, match="a.jsonl: line 1: .* more than model.max_length 256; .*task.truncate"):
        task.dataset(df, bundle, data_cfg())
    with pytest.warns(UserWarning, match="1 example\\(s\\) longer than model.max_length 256 were truncated"):
        ds, _ = type(task)(truncate=True).dataset(df, bundle, data_cfg())
    assert ds.lengths[0] == 256 and ds.collate([0])["labels"][-1] == bundle.tokenizer.eos_token_id


def test_target_logits_are_the_models_own_logits_at_those_positions(lm, tmp_path):
    from fmtune.models import causal_lm

    bundle, task = lm
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", repeat_rows(5, 3)), data_cfg())
    batch = task.dataset(df, bundle, data_cfg())[0].collate(list(range(5)))
    labels = batch.pop("labels")
    net = causal_lm.TargetLogits(bundle.model, bundle.tokenizer).eval()
    with torch.no_grad():
        ours = net(**batch).logits
        full = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert ours.shape == (len(labels), bundle.model.config.vocab_size)
    torch.testing.assert_close(ours, full.flatten(0, 1)[batch["target_index"]], rtol=1e-4, atol=1e-5)


def test_a_shared_prefix_runs_once_with_the_same_logits_and_gradients(lm, tmp_path):
    """Rows that start alike (template + instruction) share one forward pass of their common tokens;
    the logits at the target positions and the LoRA gradients are those of the plain forward."""
    import copy

    from fmtune.models import causal_lm

    bundle, _ = lm
    task = type(lm[1])(instruction="Say every one of the following words again, in the same order as given")
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", repeat_rows(6, 4)), data_cfg())
    batch = task.dataset(df, bundle, data_cfg())[0].collate(list(range(6)))
    assert int(batch["prefix"]) >= causal_lm.MIN_SHARED_PREFIX
    labels = batch.pop("labels")
    lora = copy.deepcopy(bundle)
    causal_lm.apply_strategy(lora, config.from_dict({"task": {"type": "generation"}}).strategy)
    with torch.no_grad():  # a trained adapter (B = 0 at init would hide a wrong gradient path)
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    net = causal_lm.TargetLogits(lora.model, lora.tokenizer).eval()
    grads = []
    for prefix in (batch["prefix"], None):
        out = net(**{**batch, "prefix": prefix}).logits
        torch.nn.functional.cross_entropy(out, labels).backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in lora.model.named_parameters()
                                     if p.grad is not None}))
        lora.model.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-3, atol=1e-6)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(lm):
    bundle, _ = lm
    tok = bundle.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("repeat: red", "repeat: one two three four five", "cat")]
    s = GenerationSettings(max_new_tokens=6, batch_size=3)
    together = generate(bundle.model, tok, prompts, s, "cpu")
    alone = [generate(bundle.model, tok, [p], s, "cpu")[0] for p in prompts]
    assert together == alone


def test_a_field_naming_each_rows_split_splits_generation_data(tiny_llama, tmp_path):
    """Instruction data written out whole with each row's split: its train rows train, its validation and test rows
    validate and test, and fmtune evaluate reads the test rows again."""
    rows = [dict(r, split=s) for r, s in zip(repeat_rows(36, 3), ["train", "test", "train", "validation"] * 9)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    out = train_silently(gen_cfg(tiny_llama, tmp_path / "all.jsonl", tmp_path / "run", train={"max_steps": 2}))
    info = json.loads((Path(out["run_dir"]) / "run.json").read_text())["data"]
    assert (info["train"]["rows"], info["val"]["rows"], info["test"]["rows"]) == (18, 9, 9)
    assert (info["train"]["source"], info["test"]["source"]) == (str(tmp_path / "all.jsonl"),) * 2
    first = json.loads((Path(out["run_dir"]) / "test_answers.jsonl").read_text().splitlines()[0])
    assert first["prompt"].endswith(rows[1]["prompt"])  # the first test row, not the first row
    again = api.evaluate(out["run_dir"], quiet=True)
    assert again["n_test"] == 9 and again["test"]["loss"] == pytest.approx(out["eval"]["test"]["loss"], rel=1e-4)


def test_generation_needs_a_causal_lm_and_a_strategy_that_applies(tiny_bert, tiny_llama, gen_files, tmp_path):
    with pytest.raises(ModelError, match="needs a model that generates text; .* bert model that does not"):
        api.train(gen_cfg(tiny_bert, gen_files["train"], tmp_path / "r1"), quiet=True)
    with pytest.raises(ConfigError, match="strategy head does not apply to text generation"):
        api.train(gen_cfg(tiny_llama, gen_files["train"], tmp_path / "r2", strategy={"name": "head"}), quiet=True)
    with pytest.raises(ConfigError, match="strategy.targets: 'query' matches no linear layer.*q_proj"):
        api.train(gen_cfg(tiny_llama, gen_files["train"], tmp_path / "r3", strategy={"targets": "query"}),
                  quiet=True)


def test_the_default_strategy_is_lora_for_generation_and_full_otherwise():
    assert config.from_dict({"task": {"type": "generation"}}).strategy.name == "lora"
    assert config.from_dict({"task": {"type": "generation"}}).train.lr == config.DEFAULT_LR["lora"]
    assert config.from_dict({}).strategy.name == "full"


# --- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tiny_llama, gen_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-runs") / "full"
    cfg = gen_cfg(tiny_llama, gen_files["train"], out, strategy={"name": "full"},
                  train={"lr": 1e-2, "epochs": 25, "patience": None}, data={"test": str(gen_files["test"])})
    return train_silently(cfg)


def test_fine_tuning_beats_the_zero_shot_baseline_on_rouge_and_loss(full_run):
    run = Path(full_run["run_dir"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test"]["rougeL"] > ev["baseline"]["rougeL"] + 0.2
    assert ev["test"]["loss"] < ev["baseline"]["loss"] - 1.0
    assert ev["test"]["perplexity"] == pytest.approx(2.718281828 ** ev["test"]["loss"], rel=1e-6)
    answers = [json.loads(x) for x in (run / "test_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 24 and {"prompt", "reference", "baseline", "fine_tuned"} <= set(answers[0])
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert evals[0]["step"] == 0 and {"loss", "perplexity", "rougeL", "exact_match"} <= set(evals[0])
    html = (run / "report.html").read_text()
    assert "pretrained (zero-shot)" in html and "Answers" in html


def test_robustness_of_a_generation_run_answers_perturbed_prompts(full_run, tmp_path):
    """fmtune robustness was not available for generation runs (Predictor refused them). Each prompt is perturbed
    (typos, dropped and swapped words, changed case; a chat: its user turns), answered again greedily and scored on
    ROUGE-L against the same references: clean, the run's test ROUGE-L; a repeater asked to repeat fewer words
    repeats fewer; the strongest perturbations cost it more than 0.1. Plain-text rows (no prompt) are refused; the
    prompts of chats are perturbed in their user turns."""
    import numpy as np

    from fmtune.robustness import perturb_prompts, robustness

    run = Path(full_run["run_dir"])
    report = robustness(run, None, suite="quick", out=tmp_path / "rob", quiet=True)
    res = report["runs"]["full"]
    test = json.loads((run / "eval.json").read_text())["test"]
    assert res["metric"] == "rougeL" and res["clean"] == pytest.approx(test["rougeL"], abs=1e-3)
    per = {k: [r["rougeL"] for r in v["results"]] for k, v in res["perturbations"].items()}
    assert per["word_drop"][-1] < res["clean"] and min(v[-1] for v in per.values()) < res["clean"] - 0.1, per
    rows = read_rows(write_jsonl(tmp_path / "rows.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "repeat: a b c d"},
                      {"role": "assistant", "content": "a b c d"}]}, {"prompt": "repeat: x y", "completion": "x y"}]),
        data_cfg())
    out = perturb_prompts(rows, "word_drop", 0.99, np.random.default_rng(0))
    turns = json.loads(out["messages"][0])
    assert turns[0]["content"] == "be brief" and turns[1]["content"] != "repeat: a b c d"
    assert out["prompt"][1] != "repeat: x y" and out["completion"].tolist() == rows["completion"].tolist()
    write_jsonl(tmp_path / "plain.jsonl", [{"text": "just text"}] * 3)
    with pytest.raises(DataError, match="robustness perturbs the prompts"):
        robustness(run, tmp_path / "plain.jsonl", out=tmp_path / "rob2", quiet=True)


def test_evaluate_scores_a_generation_run_again_as_training_did(full_run, capsys):
    """fmtune evaluate on the run's test file (the CLI, --baseline) gives the test and zero-shot metrics that
    training wrote (same rows, same greedy answers)."""
    from fmtune.cli import main

    run = Path(full_run["run_dir"])
    trained = json.loads((run / "eval.json").read_text())
    assert main(["evaluate", str(run), "--baseline", "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test"] == pytest.approx(trained["test"], abs=1e-6)
    assert again["baseline"] == pytest.approx(trained["baseline"], abs=1e-6)
    assert again["n_test"] == trained["n_test"] == 24 and again["n_generated"] == 24


def test_the_generate_verb_prints_json_lines(full_run, capsys):
    from fmtune.cli import main

    assert main(["generate", full_run["run_dir"], "--prompt", "repeat: cat", "--prompt", "repeat: dog", "-q"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["repeat: cat", "repeat: dog"] and all("answer" in r for r in lines)
    assert main(["predict", full_run["run_dir"], "--text", "repeat: cat", "-q"]) == 2
    assert "is a text generation run: answer prompts with  fmtune generate" in capsys.readouterr().err


def test_a_finished_run_generates_and_loads_in_plain_transformers(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from fmtune.generation import generate_texts

    run = full_run["run_dir"]
    recs = generate_texts(run, ["repeat: red dog"], quiet=True)
    assert recs[0]["prompt"] == "repeat: red dog" and isinstance(recs[0]["answer"], str)
    model = AutoModelForCausalLM.from_pretrained(Path(run) / "model")  # a plain folder: no fmtune needed
    assert type(model).__name__ == "LlamaForCausalLM"
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "repeat: cat"}, {"messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "answers.jsonl"
    generate_texts(run, file=tmp_path / "p.jsonl", output=out, temperature=0.8, seed=1, quiet=True)
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["repeat: cat", "x"]
    # sampled: row i drawn with seed + i, the same answers whatever the batch size (one generator drew a batch)
    prompts = ["repeat: red dog", "repeat: two cat", "repeat: red dog", "repeat: one"]
    one = generate_texts(run, prompts, temperature=1.0, seed=7, batch_size=1, quiet=True)
    assert one == generate_texts(run, prompts, temperature=1.0, seed=7, batch_size=4, quiet=True)
    assert one[0] == generate_texts(run, prompts[:1], temperature=1.0, seed=7, quiet=True)[0]


def test_a_lora_run_merges_into_a_folder_that_generates_the_same_text(tiny_llama, gen_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fmtune.exporter import export
    from fmtune.generation import generate_texts

    cfg = gen_cfg(tiny_llama, gen_files["train"], tmp_path / "lora", train={"lr": 5e-3, "epochs": 2})
    summary = api.train(cfg, quiet=True, report=False)
    assert (Path(summary["run_dir"]) / "model" / "adapter_config.json").is_file()
    ours = generate_texts(summary["run_dir"], ["repeat: red dog", "repeat: one"], quiet=True)
    res = export(summary["run_dir"], tmp_path / "merged", merge=True, quiet=True)
    assert res["kind"] == "merged" and res["same_greedy_answers"] == res["checked_prompts"] > 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    theirs = []
    for p in ("repeat: red dog", "repeat: one"):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        theirs.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert [r["answer"] for r in ours] == theirs


def test_stdlib_docstrings_split_keeps_modules_apart():
    from fmtune.zoo.datasets import _first_sentence, split

    df = pd.DataFrame({"code": [f"def f{i}(): pass" for i in range(60)], "summary": ["Do it now."] * 60,
                       "group": [f"mod{i % 12}" for i in range(60)]})
    train, val, test = split(df, (None, 10, 10), seed=0)
    assert len(train) + len(val) + len(test) == 60 and len(val) >= 10 and len(test) >= 10
    assert not (set(train.group) & set(test.group) or set(train.group) & set(val.group) or
                set(val.group) & set(test.group))
    assert _first_sentence("Return the sum of a and b.\n\nMore text.") == "Return the sum of a and b."
    assert _first_sentence(">>> f(1) is the way to call it.") is None and _first_sentence("Too short.") is None


def test_serve_generate_whole_and_streamed_with_key_and_limits(full_run):
    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    expected = gen.answer([{"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}])[0]
    app = create_app(gen, Limits(max_new_tokens=16, max_items=2), api_key="k")
    with TestClient(app) as client:
        h = {"X-API-Key": "k"}
        assert client.post("/generate", json={"prompt": "repeat: red dog"}).status_code == 401
        r = client.post("/generate", json={"prompt": "repeat: red dog"}, headers=h)
        assert r.status_code == 200 and r.json()["answer"] == expected and r.json()["model_version"] == gen.version
        many = client.post("/generate", json={"prompt": ["repeat: red dog", "repeat: cat"]}, headers=h).json()
        assert many["answers"][0] == expected and len(many["answers"]) == 2
        chat = client.post("/generate", json={"messages": [{"role": "user", "content": "repeat: red dog"}]}, headers=h)
        assert chat.json()["answer"] == expected  # a one-turn chat is the prompt in the chat template
        with client.stream("POST", "/generate", json={"prompt": "repeat: red dog", "stream": True}, headers=h) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and events[-1]["answer"] == expected
        assert "".join(e["token"] for e in events[:-1]).strip() == expected
        for body, status, msg in [
            ({"prompt": "x", "max_new_tokens": 17}, 422, "max_new_tokens' must be in \\[1, 16\\]"),
            ({"prompt": ""}, 422, "non-empty string"),
            ({"prompt": ["a", "b", "c"]}, 413, "limit is 2"),
            ({"messages": [{"role": "robot", "content": "x"}]}, 422, "unknown role 'robot'"),
            ({"text": "x"}, 422, '"prompt"'),
            ({"prompt": ["a", "b"], "stream": True}, 422, "one prompt at a time"),
        ]:
            r = client.post("/generate", json=body, headers=h)
            assert r.status_code == status and re.search(msg, r.json()["error"]), (body, r.json())
        assert client.get("/metadata", headers=h).json()["task"] == "generation"


def test_the_service_says_which_prompts_it_cut_and_refuses_them_under_long_text_reject(full_run):
    """A prompt longer than the model reads is cut as `fmtune generate` cuts it, and POST /generate lists it in
    "truncated" (whole and streamed); --long-text reject answers 413 on every generation route instead."""
    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    long = "repeat: " + "red dog " * gen.prompt_room
    row = {"kind": "prompt", "prompt": long, "completion": None, "messages": None}
    ids, whole = gen.prompt_ids(row)
    assert len(ids) == gen.prompt_room < whole
    with TestClient(create_app(gen, Limits(max_new_tokens=8))) as client:
        r = client.post("/generate", json={"prompt": ["repeat: cat", long]}).json()
        assert r["truncated"] == [1] and r["answers"][1] == gen.answer([row])[0]
        assert "truncated" not in client.post("/generate", json={"prompt": "repeat: cat"}).json()
        with client.stream("POST", "/generate", json={"prompt": long, "stream": True, "max_new_tokens": 4}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and events[-1]["truncated"] == [0]
        used = client.post("/v1/completions", json={"model": "m", "prompt": long, "max_tokens": 4}).json()["usage"]
        assert used["prompt_tokens"] == gen.prompt_room  # (what the model read)
    with TestClient(create_app(gen, Limits(max_new_tokens=8, long_text="reject"))) as client:
        for path, body, where in [("/generate", {"prompt": ["repeat: cat", long]}, "prompt\\[1\\]"),
                                  ("/generate", {"messages": [{"role": "user", "content": long}]}, "messages"),
                                  ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                                       "content": long}]}, "messages"),
                                  ("/v1/completions", {"model": "m", "prompt": long}, "prompt\\[0\\]"),
                                  ("/v1/responses", {"model": "m", "input": long}, "input"),
                                  ("/", {"inputs": long}, "inputs")]:
            r = client.post(path, json=body)
            text = json.dumps(r.json())
            assert r.status_code == 413 and re.search(f"{where}: {whole} tokens; this model reads at most "
                                                      f"{gen.prompt_room}", text), (path, text)
        assert client.post("/generate", json={"prompt": "repeat: cat"}).status_code == 200


def test_the_ollama_client_talks_to_a_served_run(full_run):
    """The ollama package itself, pointed at the service (host=URL, the service's key in its headers): generate and
    chat, whole and streamed as JSON lines, the token limit (num_predict), stop strings, counts; list and show; its
    errors raised as its ResponseError with the status and the option at fault."""
    import ollama
    from conftest import live_server

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    row = {"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}
    (c,) = gen.complete([row])
    prompt_tokens = len(gen.prompt_ids(row)[0])
    name = Path(full_run["run_dir"]).name
    with live_server(create_app(gen, Limits(max_new_tokens=16), api_key="k")) as url:
        client = ollama.Client(host=url, headers={"Authorization": "Bearer k"})
        r = client.generate(model="any", prompt="repeat: red dog")
        assert (r.response, r.done, r.done_reason, r.model) == (c.text, True, "stop", name)
        assert (r.prompt_eval_count, r.eval_count) == (prompt_tokens, c.tokens) and r.total_duration > 0
        parts = list(client.generate(model="any", prompt="repeat: red dog", stream=True))
        assert "".join(p.response for p in parts) == c.text and parts[-1].done and not parts[0].done
        assert parts[-1].eval_count == c.tokens and parts[-1].done_reason == "stop"
        chat = client.chat(model="any", messages=[{"role": "user", "content": "repeat: red dog"}])
        assert (chat.message.role, chat.message.content, chat.done_reason) == ("assistant", c.text, "stop")
        parts = list(client.chat(model="any", messages=[{"role": "user", "content": "repeat: red dog"}], stream=True))
        assert "".join(p.message.content for p in parts) == c.text and parts[-1].done
        short = client.generate(model="any", prompt="repeat: red dog", options={"num_predict": 1})
        assert short.done_reason == "length" and short.eval_count == 1
        cut = client.generate(model="any", prompt="repeat: red dog", options={"stop": [c.text[2:4]]})
        assert cut.response == c.text[:c.text.find(c.text[2:4])] and cut.done_reason == "stop"
        loaded = client.generate(model="any", prompt="repeat: red dog", options={"num_ctx": 4096, "num_thread": 2})
        assert loaded.response == c.text  # (how a model is loaded is not this service's to set: let be)
        assert [m.model for m in client.list().models] == [name]
        assert client.show(name).capabilities == ["completion"]
        for kwargs, status, match in [({"options": {"top_k": 5}}, 422, "options.top_k is not supported"),
                                      ({"format": "json"}, 422, "'format' is not supported"),
                                      ({"options": {"num_predict": 99}}, 422, "num_predict")]:
            with pytest.raises(ollama.ResponseError, match=match) as e:
                client.generate(model="any", prompt="repeat: red dog", **kwargs)
            assert e.value.status_code == status
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=url).chat(model="any", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401


def test_the_official_openai_client_talks_to_a_served_run(full_run):
    """The openai package itself, pointed at the service (base_url .../v1, the service's key as its own):
    models, chat completions and completions, whole and streamed, stop strings, the token limit, usage,
    and its errors raised as the client's own exception classes with the field at fault."""
    import openai
    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    row = {"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}
    (c,) = gen.complete([row])
    assert c.stopped and c.tokens > 1 and len(c.text) > 2
    other = gen.answer([{**row, "prompt": "repeat: one two"}])[0]
    prompt_tokens = len(gen.prompt_ids(row)[0])
    name = Path(full_run["run_dir"]).name
    with TestClient(create_app(gen, Limits(max_new_tokens=16), api_key="k")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
        assert [m.id for m in client.models.list()] == [name] and client.models.retrieve(name).owned_by == "fmtune"
        chat = [{"role": "developer", "content": "x"}, {"role": "user", "content": [{"type": "text",
                                                                                      "text": "repeat: red dog"}]}]
        r = client.chat.completions.create(model="any-name", messages=chat[1:])
        assert r.choices[0].message.content == c.text and r.choices[0].finish_reason == "stop" and r.model == name
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, c.tokens)
        # a system turn before it changes the prompt the model reads (the run's chat template)
        r = client.chat.completions.create(model=name, messages=chat)
        assert r.usage.prompt_tokens > prompt_tokens
        chunks = list(client.chat.completions.create(model=name, messages=chat[1:], stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == c.tokens and not chunks[-1].choices
        r = client.chat.completions.create(model=name, messages=chat[1:], max_tokens=1)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
        # a vanishing temperature decodes greedily (it made the sampling probabilities NaN: a 500, found by the fuzz)
        r = client.responses.create(model=name, input="repeat: red dog", temperature=3.3e-165)
        assert r.output_text == c.text
        streamed = client.chat.completions.create(model=name, messages=chat[1:], temperature=1e-300, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == c.text
        stop = c.text[len(c.text) // 2:]  # a stop string inside the answer: the answer ends before it
        r = client.chat.completions.create(model=name, messages=chat[1:], stop=[stop, "zzz"])
        assert r.choices[0].message.content == c.text[:c.text.index(stop)] and r.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model=name, messages=chat[1:], stop=stop, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == c.text[:c.text.index(stop)]
        r = client.completions.create(model=name, prompt=["repeat: red dog", "repeat: one two"])
        assert [x.text for x in r.choices] == [c.text, other] and r.object == "text_completion"
        pieces = client.completions.create(model=name, prompt="repeat: red dog", stream=True)
        assert "".join(p.choices[0].text for p in pieces) == c.text
        # the Responses API: a string, or messages of input_text parts; streamed as its typed events
        r = client.responses.create(model=name, input="repeat: red dog")
        assert (r.output_text, r.status, r.model) == (c.text, "completed", name)
        assert (r.usage.input_tokens, r.usage.output_tokens) == (prompt_tokens, c.tokens)
        r = client.responses.create(model=name, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "repeat: red dog"}]}], instructions="x")
        assert r.usage.input_tokens > prompt_tokens  # the instructions are read, as a system turn
        r = client.responses.create(model=name, input="repeat: red dog", max_output_tokens=1)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        events = list(client.responses.create(model=name, input="repeat: red dog", stream=True))
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == c.text
        assert events[-1].type == "response.completed" and events[-1].response.output_text == c.text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for kw, match in [({"previous_response_id": "resp_1"}, "'previous_response_id' is not supported"),
                          ({"tools": [{"type": "web_search"}]}, "'tools' is not supported"),
                          ({"max_output_tokens": 17}, r"'max_output_tokens' must be in \[1, 16\]"),
                          ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                           "input_text / output_text parts"),
                          ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
                           "only messages")]:
            with pytest.raises(openai.UnprocessableEntityError, match=match):
                client.responses.create(**{"model": name, "input": "repeat: red dog", **kw})
        with pytest.raises(openai.UnprocessableEntityError, match="'n'.* not supported") as e:
            client.chat.completions.create(model=name, messages=chat[1:], n=2)
        assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
        for kw, match in [({"max_tokens": 17}, r"'max_tokens' must be in \[1, 16\]"),
                          ({"messages": [{"role": "assistant", "content": "hi"}]}, "end with the user's turn"),
                          ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools'"),
                          ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4")]:
            with pytest.raises(openai.UnprocessableEntityError, match=match):
                client.chat.completions.create(**{"model": name, "messages": chat[1:], **kw})
        with pytest.raises(openai.UnprocessableEntityError, match="token-id prompts"):
            client.completions.create(model=name, prompt=[[1, 2, 3]])
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.models.retrieve("gpt-4o")
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        # the Hugging Face Inference API's text generation (POST /), as TGI answers it
        r = http.post("/", json={"inputs": "repeat: red dog", "parameters": {"max_new_tokens": 16, "details": False}},
                      headers={"X-API-Key": "k"})
        assert r.json() == [{"generated_text": c.text}]
        r = http.post("/", json={"inputs": "repeat: red dog", "parameters": {"return_full_text": True, "stop": [stop]}},
                      headers={"X-API-Key": "k"})
        assert r.json() == [{"generated_text": "repeat: red dog" + c.text[:c.text.index(stop)]}]
        for params, message in [({"details": True}, "parameters.details"), ({"top_k": 5}, "parameters.top_k"),
                                ({"max_new_tokens": 99}, r"max_new_tokens' must be in \[1, 16\]")]:
            r = http.post("/", json={"inputs": "x", "parameters": params}, headers={"X-API-Key": "k"})
            assert r.status_code == 422 and re.search(message, r.json()["error"]), (params, r.text)
        # a run trained with an instruction: a one-turn chat is asked with it, as a prompt is (and as in training)
        gen.task.instruction = "Say it again."
        r = client.chat.completions.create(model=name, messages=chat[1:])
        assert r.usage.prompt_tokens == len(gen.prompt_ids(row)[0]) > prompt_tokens


def test_the_official_anthropic_client_talks_to_a_served_run(full_run):
    """The anthropic package itself, pointed at the service (base_url, the service's key as its x-api-key): the
    Messages API answered as POST /generate answers (the same greedy text), whole and streamed (its typed events),
    a system prompt read as a system turn, stop sequences and the token limit as its stop reasons, usage, token
    counting; what it cannot do is its BadRequestError naming the field; a wrong key its AuthenticationError."""
    import anthropic
    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    row = {"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}
    (c,) = gen.complete([row])
    assert c.stopped and c.tokens > 1 and len(c.text) > 2
    prompt_tokens = len(gen.prompt_ids(row)[0])
    name = Path(full_run["run_dir"]).name
    ask = [{"role": "user", "content": "repeat: red dog"}]
    with TestClient(create_app(gen, Limits(max_new_tokens=16), api_key="k")) as http:
        client = anthropic.Anthropic(base_url="http://testserver", api_key="k", http_client=http, max_retries=0)
        m = client.messages.create(model="claude-any", max_tokens=16, messages=ask)
        assert (m.content[0].text, m.stop_reason, m.stop_sequence, m.model) == (c.text, "end_turn", None, name)
        assert (m.usage.input_tokens, m.usage.output_tokens) == (prompt_tokens, c.tokens)
        blocks = [{"role": "user", "content": [{"type": "text", "text": "repeat: "}, {"type": "text",
                                                                                     "text": "red dog"}]}]
        assert client.messages.create(model="x", max_tokens=16, messages=blocks).content[0].text == c.text
        assert client.messages.count_tokens(model="x", messages=ask).input_tokens == prompt_tokens
        with_system = client.messages.create(model="x", max_tokens=16, messages=ask, system="Be brief.")
        assert with_system.usage.input_tokens > prompt_tokens  # read as a system turn (the run's chat template)
        assert client.messages.count_tokens(model="x", messages=ask, system="Be brief.").input_tokens == \
            with_system.usage.input_tokens
        short = client.messages.create(model="x", max_tokens=1, messages=ask)
        assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 1
        stop = c.text[len(c.text) // 2:]
        cut = client.messages.create(model="x", max_tokens=16, messages=ask, stop_sequences=["zzz", stop])
        assert (cut.content[0].text, cut.stop_reason, cut.stop_sequence) == (c.text[:c.text.index(stop)],
                                                                            "stop_sequence", stop)
        with client.messages.stream(model="x", max_tokens=16, messages=ask) as streamed:
            assert "".join(streamed.text_stream) == c.text
            final = streamed.get_final_message()
        assert (final.content[0].text, final.stop_reason, final.usage.output_tokens) == (c.text, "end_turn", c.tokens)
        events = list(client.messages.create(model="x", max_tokens=16, messages=ask, stop_sequences=[stop],
                                             stream=True))
        assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
        assert events[-1].type == "message_stop" and events[-2].delta.stop_reason == "stop_sequence"
        assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == c.text[:c.text.index(stop)]
        for kw, match in [({"max_tokens": 17}, r"'max_tokens' must be in \[1, 16\]"),
                          ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools: not supported"),
                          ({"extra_body": {"top_k": 5}}, "top_k: not supported"),
                          ({"messages": [*ask, {"role": "assistant", "content": "Sure"}]}, "prefill"),
                          ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
                              "type": "base64", "media_type": "image/png", "data": "x"}}]}]},
                           "only text blocks are supported")]:
            with pytest.raises(anthropic.BadRequestError, match=match) as e:
                client.messages.create(**{"model": "x", "max_tokens": 16, "messages": ask, **kw})
            assert e.value.body["error"]["type"] == "invalid_request_error"
        listed = client.models.list()
        assert [(m.id, m.display_name, m.type) for m in listed.data] == [(name, name, "model")]
        assert listed.has_more is False and client.models.retrieve(name).created_at.year >= 2026
        bad = anthropic.Anthropic(base_url="http://testserver", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model="x", max_tokens=16, messages=ask)


def test_a_streaming_client_that_goes_away_frees_the_service_at_once(full_run):
    """A real server: the client reads two events of a long streamed answer and hangs up; the decoding
    stops there and the next request is answered, not queued behind the rest of that answer."""
    import time

    import httpx
    from conftest import live_server

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    gen.bundle.tokenizer.eos_token = "<unk>"  # (this Generator's own) an end it never decodes: 300 tokens
    steps = []
    gen.bundle.model.register_forward_pre_hook(lambda module, args: (steps.append(1), time.sleep(0.01)) and None)
    with live_server(create_app(gen, Limits(max_new_tokens=300))) as url:
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "repeat: cat"}]}),
                           ("/generate", {"prompt": "repeat: cat"})]:
            steps.clear()
            with httpx.stream("POST", url + path, json={**body, "model": "m", "max_tokens": 300,
                                                        "max_new_tokens": 300, "stream": True}, timeout=60) as s:
                lines = s.iter_lines()
                assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data")
            r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "repeat: dog", "max_tokens": 1},
                           timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
            assert len(steps) < 100, (path, len(steps))  # the whole answer would be 300 steps (and 3 s)


def test_concurrent_requests_greedy_and_sampled_are_decoded_together_each_with_its_own_answer(full_run):
    """Whole answers of concurrent requests (POST /generate and the OpenAI routes alike) share batched
    decodings when they ask for as many new tokens: greedy and sampled alike, each sampled row drawn with its own
    seed (``RowSampler``), so its answer is the one it gets alone."""
    import asyncio

    import httpx

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    prompts = [f"repeat: {' '.join(WORDS[i % 7:i % 7 + 2])}" for i in range(12)]
    alone = gen.answer([{"kind": "prompt", "prompt": p, "completion": None, "messages": None} for p in prompts])
    app = create_app(gen, Limits(max_wait_ms=300))

    def request(i: int, p: str) -> tuple[str, dict]:
        if i % 3 == 0:
            return "/generate", {"prompt": p}
        if i % 3 == 1:
            return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}]}
        return "/v1/completions", {"model": "m", "prompt": p}

    async def main(extra: list[tuple[str, dict]]):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
            return await asyncio.gather(*[client.post(path, json=body) for path, body in
                                          [request(i, p) for i, p in enumerate(prompts)] + extra])

    sampled = [("/generate", {"prompt": prompts[0], "temperature": 1.0, "seed": s}) for s in (3, 3, 4)]
    sampled.append(("/generate", {"prompt": prompts[0], "temperature": 1.0, "top_p": 1e-6, "seed": 5}))
    rs = asyncio.run(main(sampled))
    texts = [r.json().get("answer") or (r.json()["choices"][0].get("message") or r.json()["choices"][0])
             for r in rs[:12]]
    texts = [t if isinstance(t, str) else t.get("content", t.get("text")) for t in texts]
    assert texts == alone  # each request got its own answer, as asked alone
    row = {"kind": "prompt", "prompt": prompts[0], "completion": None, "messages": None}
    # a seeded sample is the one drawn alone, however it was batched; another seed draws another; a top_p that
    # keeps one token is greedy
    drawn = [gen.complete([row], temperature=1.0, seed=s)[0].text for s in (3, 4)]
    assert [r.json()["answer"] for r in rs[12:15]] == [drawn[0], drawn[0], drawn[1]] and drawn[0] != drawn[1]
    assert rs[15].json()["answer"] == alone[0]
    stats = app.state.batcher.stats
    # sampled and greedy requests share decodings (sampled ones were decoded alone: 4 more)
    assert stats["requests"] == 16 and stats["batches"] <= 3, stats


def test_concurrent_streams_share_batched_decodings_each_with_its_own_answer(full_run):
    """Each stream held the model until its answer ended: eight concurrent streams took eight decodings, the last
    client waiting for the seven answers before. Streams now join the service's batches (with requests that are
    not streamed): POST /generate, OpenAI chat and TGI streams each get their own answer, as asked alone, their
    pieces adding up to it, OpenAI's usage counting its own tokens; a client that hangs up stops its own row, not
    the others'."""
    import asyncio

    import httpx

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    prompts = [f"repeat: {' '.join(WORDS[i % 7:i % 7 + 2])}" for i in range(8)]
    rows = [{"kind": "prompt", "prompt": p, "completion": None, "messages": None} for p in prompts]
    alone = gen.complete(rows)
    app = create_app(gen, Limits(max_wait_ms=300))

    def request(i: int, p: str) -> tuple[str, dict]:
        if i % 4 == 0:
            return "/generate", {"prompt": p, "stream": True}
        if i % 4 == 1:
            return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}],
                                            "stream": True, "stream_options": {"include_usage": True}}
        if i % 4 == 2:
            return "/", {"inputs": p, "stream": True}
        return "/generate", {"prompt": p}

    def text_of(path: str, r: httpx.Response) -> tuple[str, int | None]:
        if "stream" not in r.request.content.decode():
            return r.json()["answer"], None
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ") and x != "data: [DONE]"]
        if path == "/generate":
            assert "".join(e["token"] for e in events[:-1]).strip() == events[-1]["answer"]
            return events[-1]["answer"], None
        if path == "/":
            return events[-1]["generated_text"], None
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        return text, events[-1]["usage"]["completion_tokens"]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
            return await asyncio.gather(*[client.post(path, json=body) for path, body in
                                          [request(i, p) for i, p in enumerate(prompts)]])

    got = [text_of(request(i, p)[0], r) for i, (p, r) in enumerate(zip(prompts, asyncio.run(main())))]
    assert [t for t, _ in got] == [c.text for c in alone]
    assert [n for _, n in got if n is not None] == [alone[i].tokens for i in range(1, 8, 4)]
    stats = app.state.batcher.stats
    assert stats["requests"] == 8 and stats["batches"] <= 2, stats  # (the first may start alone)

    # rows decoded together: one stops as its sink is closed; the others go on to their own whole answers
    pieces: list[list[str]] = [[], [], []]
    sinks = [StreamSink(pieces[0].append), StreamSink(pieces[1].append), None]

    def close_after_one(text: str) -> None:
        pieces[1].append(text)
        sinks[1].closed.set()

    sinks[1].put = close_after_one
    gen.bundle.tokenizer.eos_token = "<unk>"  # (this Generator's own) an end it never decodes: all 40 tokens
    three = rows[:3]
    together = gen.complete(three, max_new_tokens=40, sinks=sinks)
    each = gen.complete(three, max_new_tokens=40)
    assert together[0] == each[0] and together[2] == each[2] and each[1].tokens == 40
    assert together[1].tokens < 10 and len(pieces[1]) == 1
    assert "".join(pieces[0]).strip() == together[0].text


def test_schema_fuzz_of_a_generation_service_finds_no_server_error(full_run):
    """/generate and the OpenAI routes, with requests generated from the service's own schema."""
    from test_serve import fuzz

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    assert fuzz(create_app(Generator(full_run["run_dir"]), Limits(max_new_tokens=8, max_items=4)), 25) >= 60


def test_triton_generate_extension_answers_as_generate_does(full_run):
    """Triton's generate extension (the v2 protocol's, as TensorRT-LLM's and vLLM's backends serve it) was not
    served. Now POST /v2/models/NAME/generate answers text_input as POST /generate does (greedy), its decoding
    parameters top-level or under "parameters"; generate_stream streams the same answer as server-sent events;
    what it cannot do is a 422 naming it; the model's metadata says its input and output."""
    import json

    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(full_run["run_dir"])
    want = gen.answer([{"kind": "prompt", "prompt": "repeat: two cat", "completion": None, "messages": None}],
                      max_new_tokens=12)[0]
    with TestClient(create_app(gen, Limits(max_new_tokens=16))) as client:
        r = client.post("/v2/models/ensemble/generate", json={"text_input": "repeat: two cat", "max_tokens": 12})
        assert r.status_code == 200 and r.json() == {"model_name": "ensemble", "model_version": gen.version,
                                                     "text_output": want}
        nested = client.post("/v2/models/m/generate", json={"text_input": "repeat: two cat",
                                                            "parameters": {"max_tokens": 12, "temperature": 0}})
        assert nested.json()["text_output"] == want
        with client.stream("POST", "/v2/models/m/generate_stream",
                           json={"text_input": "repeat: two cat", "max_tokens": 12}) as stream:
            events = [json.loads(x.removeprefix("data: ")) for x in stream.iter_lines() if x.startswith("data: ")]
        assert "".join(e["text_output"] for e in events).strip() == want.strip() and len(events) >= 1
        for body, message in [({"text_input": "x", "top_k": 5}, "'top_k' is not supported"),
                              ({"text_input": ""}, "'text_input' must be a non-empty string"),
                              ({"text_input": "x", "max_tokens": 99}, "max_tokens")]:
            bad = client.post("/v2/models/m/generate", json=body)
            assert bad.status_code in (413, 422) and message in bad.json()["error"], (body, bad.text)
        meta = client.get("/v2/models/m").json()
        assert meta["inputs"][0]["name"] == "text_input" and meta["outputs"][0]["name"] == "text_output"


def test_huggingface_hub_inference_client_generates_text(full_run, monkeypatch):
    from conftest import hf_inference_client, live_server

    from fmtune.generation import Generator
    from fmtune.serve import create_app

    gen = Generator(full_run["run_dir"])
    want = gen.answer([{"kind": "prompt", "prompt": "repeat: two cat", "completion": None, "messages": None}])[0]
    with live_server(create_app(gen)) as url:
        client = hf_inference_client(url, monkeypatch)
        assert client.text_generation("repeat: two cat", max_new_tokens=16) == want
        assert "".join(client.text_generation("repeat: two cat", max_new_tokens=16, stream=True)) == want
        import httpx

        with httpx.stream("POST", url, json={"inputs": "repeat: two cat", "stream": True}, timeout=60) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1]["generated_text"] == want  # TGI's last event carries the whole text
        chat = client.chat_completion([{"role": "user", "content": "repeat: two cat"}], max_tokens=16)
        assert chat.choices[0].message.content == want  # its chat_completion is OpenAI's, under /v1


def test_stop_strings_never_reach_a_streaming_client_even_in_part():
    from fmtune.serve_openai import StopScanner, cut_at_stop

    s = StopScanner(["xyz"])
    assert [s.feed(p) for p in ["  abx", "y", "q"]] + [s.flush()] == ["ab", "", "xyq", ""] and not s.stopped
    s = StopScanner(["o w", "END"])
    out = []
    for p in ["he", "llo", " wo", "rld"]:
        out.append(s.feed(p))
        if s.stopped:
            break
    assert "".join(out) == "hell" and s.stopped and s.flush() == ""
    assert cut_at_stop("a.b;c", [";", "."]) == ("a", True) and cut_at_stop("abc", ["x"]) == ("abc", False)


def test_closing_a_stream_early_stops_the_decoding(full_run):
    """A client that goes away (or a stop string) closes the stream: the worker thread decodes at most a
    token more, not on to max_new_tokens while the next request waits for the lock."""
    import time

    from fmtune.generation import Generator

    gen = Generator(full_run["run_dir"])
    gen.bundle.tokenizer.eos_token = "<unk>"  # (this Generator's own) an end it never decodes: it would go on
    steps = []

    def slow(module, args):
        steps.append(1)
        time.sleep(0.01)

    handle = gen.bundle.model.register_forward_pre_hook(slow)
    try:
        row = {"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}
        info = {}
        pieces = gen.stream(row, max_new_tokens=200, info=info)
        next(pieces)
        pieces.close()
        assert len(steps) < 50, len(steps)
        assert not info  # closed before its end: no token count
        steps.clear()
        whole = list(gen.stream(row, max_new_tokens=20, info=info))
        assert info == {"tokens": 20, "stopped": False} and len(steps) == 20 and whole
    finally:
        handle.remove()


@pytest.mark.slow
def test_real_smollm2_answers_and_learns_to_summarise_stdlib_functions(tmp_path):
    """The GGUF weights, dequantised and converted once, give a working chat model; a short LoRA run
    on real standard-library functions lowers the validation loss and raises ROUGE-L over zero-shot."""
    from fmtune.generation import Generator  # noqa: F401  (the verbs load it)
    from fmtune.models import build
    from fmtune.tasks.generation import Generation
    from fmtune.zoo.datasets import export

    bundle = build.create(config.from_dict({"model": {"name": "smollm2-135m"}}).model, Generation())
    tok = bundle.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? One word."}],
                                  add_generation_prompt=True, tokenize=False)
    answer = generate(bundle.model, tok, [tok(ids, add_special_tokens=False)["input_ids"]],
                      GenerationSettings(max_new_tokens=12), "cpu")[0]
    assert "Paris" in answer
    files = export("stdlib-docstrings", tmp_path / "data", sizes=(96, 24, 24), seed=0)
    cfg = config.from_dict({
        "model": {"name": "smollm2-135m", "max_length": 384},
        "task": {"type": "generation", "instruction": "Summarise this Python function in one sentence."},
        "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"]),
                 "input_column": "code", "target_column": "summary"},
        "train": {"epochs": 1, "batch_size": 8, "patience": None},
        "eval": {"samples": 8, "test_samples": 24, "max_new_tokens": 32}, "out": str(tmp_path / "run")})
    summary = api.train(cfg, quiet=True, report=False)
    ev = summary["eval"]
    assert ev["test"]["loss"] < ev["baseline"]["loss"] - 0.3
    assert ev["test"]["rougeL"] > ev["baseline"]["rougeL"]


@pytest.mark.parametrize("strategy", ["dora", "ia3", "prompt", "last_n"])
def test_every_generation_strategy_trains_saves_and_answers(tiny_llama, gen_files, tmp_path, strategy):
    from fmtune.generation import generate_texts
    from fmtune.models import build
    from fmtune.tasks import task_class

    cfg = gen_cfg(tiny_llama, gen_files["train"], tmp_path / strategy, strategy={"name": strategy, "n": 1},
                  train={"epochs": 2, "lr": 1e-2, "metric": "loss"})
    summary = api.train(cfg, quiet=True, report=False)
    log = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert summary["best_step"] > 0 and summary["best"] < evals[0]["loss"]  # trained, and the trained model kept
    loaded = build.load(Path(summary["run_dir"]) / "model")
    assert (loaded.adapter == strategy) == (strategy != "last_n")
    if strategy == "last_n":  # the last block (and the final norm) trained, the first one as it was
        before = dict(build.create(cfg.model, task_class("generation")()).model.named_parameters())
        changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
        assert any(".layers.1." in n for n in changed) and not any(".layers.0." in n for n in changed)
    assert isinstance(generate_texts(summary["run_dir"], ["repeat: cat"], quiet=True)[0]["answer"], str)


# --- packing and resume ------------------------------------------------------------------------------

def test_packed_examples_give_the_padded_batchs_logits_and_gradients(lm, tmp_path):
    """train.packing: a batch as one row of its examples end to end, positions restarting at each;
    transformers' packed-sequence mask keeps attention within each example, so the logits at the
    trained positions, the loss and the gradients are those of the padded batch, with no padding."""
    from fmtune.models import causal_lm

    bundle, task = lm
    ds = task.dataset(read_rows(write_jsonl(tmp_path / "a.jsonl", repeat_rows(6, 7)), data_cfg()), bundle,
                      data_cfg())[0]
    padded = ds.collate(list(range(6)))
    ds.packed = True
    packed = ds.collate(list(range(6)))
    assert packed["input_ids"].shape == (1, int(ds.lengths.sum())) and "attention_mask" not in packed
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the padding is gone
    assert torch.equal(packed["labels"], padded["labels"])
    assert packed["position_ids"][0, : ds.lengths[0] + 1].tolist() == [*range(ds.lengths[0]), 0]
    net = causal_lm.TargetLogits(bundle.model, bundle.tokenizer).eval()
    outs = []
    for batch in (padded, packed):
        labels = batch.pop("labels")
        logits = net(**{**batch, "prefix": None}).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in bundle.model.named_parameters()}))
        bundle.model.zero_grad()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-3, atol=1e-6)
    # a packed run trains; packing is refused where it cannot apply
    s = api.train(gen_cfg(bundle.source, write_jsonl(tmp_path / "t.jsonl", repeat_rows(48, 8)), tmp_path / "run",
                          train={"packing": True, "epochs": 1}), quiet=True)
    assert s["best"] is not None
    with pytest.raises(ConfigError, match="train.packing: prompt tuning"):
        gen_cfg(bundle.source, tmp_path / "t.jsonl", tmp_path / "x", strategy={"name": "prompt"},
                train={"packing": True})
    with pytest.raises(ConfigError, match="train.packing: packs the token sequences of text generation"):
        config.from_dict({"train": {"packing": True}})


@pytest.mark.slow  # two subprocess runs (~50 s); the resume machinery is fit()'s, tested by default in test_resume.py
def test_a_killed_generation_run_resumes_to_the_same_adapter(tiny_llama, gen_files, tmp_path):
    """SIGKILL mid-epoch after a resume point, then --resume: the same evaluations (loss and
    greedy answers' ROUGE) and the same LoRA adapter as the uninterrupted run."""
    killed_run_resumes_the_same(tiny_llama, gen_files["train"], tmp_path)


def killed_run_resumes_the_same(model: Path, train_file: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from safetensors.torch import load_file

    cfg = {"model": {"name": str(model)}, "task": {"type": "generation"},
           "data": {"train": str(train_file)},
           "eval": {"max_new_tokens": 8, "samples": 8},
           "train": {"epochs": 1, "batch_size": 4, "seed": 0, "lr": 3e-3, "eval_every": 12, "save_every_steps": 5,
                     "log_every": 1, "patience": None, "num_threads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "fmtune", "train", str(tmp_path / "cfg.yaml"), "-q", "--out"]
    subprocess.run([*cli, str(tmp_path / "ref")], check=True, env=env, timeout=300)
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*cli, str(run)], env=env)
    log, sent, deadline = run / "metrics.jsonl", False, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1]).get("step", 0) >= 16:
            os.kill(proc.pid, signal.SIGKILL)  # after the evaluation at step 12 and the resume point at 15
            sent = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert sent, "the run finished before it could be stopped"
    assert not json.loads((run / "state" / "trainer.json").read_text())["done"]
    subprocess.run([sys.executable, "-m", "fmtune", "train", "--resume", str(run), "-q"], check=True, env=env,
                   timeout=300)

    def evals(d: Path) -> list[dict]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")} for r in rows
                if r["type"] == "eval"]

    assert evals(run) == evals(tmp_path / "ref") and len(evals(run)) >= 3
    a = load_file(str(tmp_path / "ref" / "model" / "adapter_model.safetensors"))
    b = load_file(str(run / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_gradients_and_auto_turns_it_on_when_memory_is_short(
        lm, tmp_path, monkeypatch):
    """Layers recomputed in the backward pass: the same LoRA gradients as keeping their activations
    (through the shared-prefix batch, which falls back to the plain forward under checkpointing);
    auto turns it on only when the largest batch would hold more than half the memory available."""
    import collections
    import copy

    import psutil

    from fmtune.models import causal_lm, wrapped

    bundle, task = lm
    df = read_rows(write_jsonl(tmp_path / "a.jsonl", repeat_rows(6, 4)), data_cfg())
    ds = task.dataset(df, bundle, data_cfg())[0]
    batch = ds.collate(list(range(6)))
    labels = batch.pop("labels")
    grads = []
    for setting in (False, True):
        lora = copy.deepcopy(bundle)
        torch.manual_seed(0)  # the same LoRA A matrices
        causal_lm.apply_strategy(lora, config.from_dict({"task": {"type": "generation"},
                                                         "strategy": {"name": "lora", "dropout": 0.0}}).strategy)
        with torch.no_grad():
            for n, p in lora.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        train = config.from_dict({"train": {"gradient_checkpointing": setting}}).train
        said = causal_lm.checkpointing(lora, train, ds.lengths, "cpu")
        assert (said is not None) == setting and wrapped.plain(lora.model).is_activation_checkpointing == setting
        lora.model.train()
        out = causal_lm.TargetLogits(lora.model, lora.tokenizer)(**batch).logits
        torch.nn.functional.cross_entropy(out, labels).backward()
        grads.append({n: p.grad.clone() for n, p in lora.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7)
    auto = config.from_dict({"train": {"batch_size": 4}}).train
    mem = collections.namedtuple("mem", "available")
    c = wrapped.plain(bundle.model).config
    need = causal_lm.ACTIVATION_BYTES * c.hidden_size * c.num_hidden_layers * 4 * int(ds.lengths.max())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(2 * need))
    plain_copy = copy.deepcopy(bundle)
    assert causal_lm.checkpointing(plain_copy, auto, ds.lengths, "cpu") is None  # exactly half: fits
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(2 * need - 1))
    said = causal_lm.checkpointing(plain_copy, auto, ds.lengths, "cpu")
    assert said and "more than half" in said and f"4 rows x {int(ds.lengths.max())} tokens" in said


def test_a_generation_run_exports_to_onnx_and_decodes_with_it(tiny_llama, gen_files, tmp_path):
    """ONNX export of generation was refused. Now a decoder-only run (its LoRA folded in) exports as transformers'
    prefill and decode graphs (the KV cache their inputs and outputs), kept only if onnxruntime gives the run's
    greedy answers; transformers' own ExportedModel loads the folder; fmtune generate / serve --backend onnx make it
    on first use and decode with it, greedy and sampled alike (the same answers as torch); int8 is refused by
    name."""
    from fastapi.testclient import TestClient
    from transformers.exporters import ExportedModel

    from fmtune.errors import ConfigError
    from fmtune.exporter import export
    from fmtune.generation import Generator, generate_texts
    from fmtune.serve import create_app

    cfg = gen_cfg(tiny_llama, gen_files["train"], tmp_path / "lora", train={"lr": 5e-3, "epochs": 2},
                  data={"test": str(gen_files["test"])})
    run = Path(api.train(cfg, quiet=True, report=False)["run_dir"])
    res = export(run, format="onnx", quiet=True)
    assert res["same_greedy_answers"] == res["checked_prompts"] == 8 and res["format"] == "onnx"
    folder = Path(res["out"])
    assert folder == run / "export" / "onnx"
    assert (folder / "prefill.onnx").is_file() and (folder / "decode.onnx").is_file()
    manifest = json.loads((folder / "export.json").read_text())
    assert set(manifest["components"]) == {"prefill", "decode"} and manifest["model_version"] == res["model_version"]
    assert set(ExportedModel.from_pretrained(str(folder)).runners) == {"prefill", "decode"}
    made = (folder / "prefill.onnx").stat().st_mtime_ns
    prep = json.loads((folder / "preprocessing.json").read_text())
    assert prep["task"] == "generation" and prep["chat_template"] is True
    prompts = ["repeat: red dog", "repeat: one two three", "repeat: blue"]
    ours = generate_texts(run, prompts, quiet=True)
    onnx = generate_texts(run, prompts, backend="onnx", quiet=True)
    assert [r["answer"] for r in onnx] == [r["answer"] for r in ours]
    sampled = dict(temperature=1.0, seed=3)
    assert ([r["answer"] for r in generate_texts(run, prompts, backend="onnx", quiet=True, **sampled)]
            == [r["answer"] for r in generate_texts(run, prompts, quiet=True, **sampled)])
    gen = Generator(run, backend="onnx")
    assert gen.metadata()["backend"] == "onnx"
    assert (folder / "prefill.onnx").stat().st_mtime_ns == made  # the export was reused: made from these weights
    with TestClient(create_app(gen)) as client:
        r = client.post("/generate", json={"prompt": prompts[0]})
    assert r.status_code == 200 and r.json()["answer"] == ours[0]["answer"]
    with pytest.raises(ConfigError, match="not int8"):
        export(run, format="onnx-int8", quiet=True)
