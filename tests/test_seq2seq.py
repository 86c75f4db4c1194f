"""Text generation with encoder-decoders (T5, Flan-T5, BART and their kin): the prompt through the encoder, the
completion out of the decoder. The batch is what transformers itself trains on (same loss), right-padded batched
generation equals one prompt at a time, a T5 and a BART train end to end (tiny random-init models with BPE
tokenizers trained here: no seq2seq weights ship offline), every strategy, export that plain transformers loads,
the service, and the errors a user meets."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_generation import gen_cfg, killed_run_resumes_the_same, repeat_rows, train_silently, write_jsonl

from fmtune import api, config
from fmtune.errors import ConfigError, DataError, ModelError

ROW = {"kind": "prompt", "prompt": "repeat: red dog", "completion": None, "messages": None}


def bpe_tokenizer(specials: list[str], template: str) -> object:
    """A byte-level BPE over the repeat rows' words, ``template`` (tokenizers' TemplateProcessing) adding the
    special tokens as T5's tokenizer (``$A </s>``) or BART's (``<s> $A </s>``) does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["prompt"] + " " + r["completion"] for r in repeat_rows(500, 0)], trainer)
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, tok.token_to_id(s))
                                                                                        for s in used])
    names = {"<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token", "<unk>": "unk_token"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{names[s]: s for s in specials})


def t5_tokenizer() -> object:
    """transformers' own T5Tokenizer (as Flan-T5 folders name it: pad 0, EOS 1, unk 2, 100 sentinel tokens) over a
    unigram vocabulary SentencePiece learns here from the repeat rows."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([r["prompt"] + " " + r["completion"]
                                                           for r in repeat_rows(500, 0)]),
                                   model_writer=buf, vocab_size=60, model_type="unigram", character_coverage=1.0,
                                   pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(1, sp.get_piece_size())]
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces])


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A 2+2-layer T5 v1.1 (gated feed-forward, as Flan-T5) with pad 0, EOS 1 and the decoder starting from pad,
    and transformers' T5Tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny-t5")
    fast = t5_tokenizer()
    cfg = T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   tie_word_embeddings=False)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    """A 2+2-layer BART: learned absolute positions, targets "<s> ... </s>", the decoder starting from EOS."""
    from transformers import BartConfig, BartForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny-bart")
    fast = bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>")
    cfg = BartConfig(vocab_size=len(fast), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0)
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def s2s_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("s2s-data")
    return {"train": write_jsonl(d / "train.jsonl", repeat_rows(160, 1)),
            "test": write_jsonl(d / "test.jsonl", repeat_rows(24, 2))}


@pytest.fixture(params=["t5", "bart"])
def seq2seq(request, tiny_t5, tiny_bart) -> Path:
    return {"t5": tiny_t5, "bart": tiny_bart}[request.param]


def loaded(path: Path, **sections):
    from fmtune.models import build
    from fmtune.tasks.generation import Generation

    cfg = config.from_dict({"model": {"name": str(path), **sections.get("model", {})}, "task": {"type": "generation"}})
    return build.create(cfg.model, Generation()), cfg


# --- the batch and generation --------------------------------------------------------------------------

def test_the_batch_gives_transformers_own_loss_and_every_target_ends_with_eos(seq2seq, s2s_files):
    """What fmtune feeds the model (encoder input right-padded, the completion shifted right after the decoder's
    start token, logits at the target positions only) gives the loss transformers computes from its own labels
    (its shift, -100 for padding), for T5 (start = pad) and BART (start = EOS, targets from <s>)."""
    from fmtune.generation import lm_net
    from fmtune.models import causal_lm
    from fmtune.tasks.generation import Generation, read_rows

    bundle, cfg = loaded(seq2seq)
    assert bundle.family == causal_lm.SEQ2SEQ_FAMILY
    tok = bundle.tokenizer
    ds, _ = Generation().dataset(read_rows(s2s_files["test"], cfg.data), bundle, cfg.data)
    rows = [0, 3, 5, 7]
    assert all(ds.targets[i][-1] == tok.eos_token_id for i in rows)
    assert all(ds.prompts[i][-1] == tok.eos_token_id for i in rows)  # the tokenizer's own specials on the input
    batch = ds.collate(rows)
    assert batch["decoder_input_ids"][0, 0] == causal_lm.decoder_start(bundle.model)
    model = bundle.model.eval()
    labels = batch.pop("labels")
    with torch.no_grad():
        ours = F.cross_entropy(lm_net(bundle)(**batch).logits, labels)
        hf = torch.full(batch["decoder_input_ids"].shape, -100)
        for b, i in enumerate(rows):
            hf[b, :len(ds.targets[i])] = torch.tensor(ds.targets[i])
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=hf).loss
    assert len(labels) == sum(len(ds.targets[i]) for i in rows)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_right_padded_batched_generation_equals_one_prompt_at_a_time(seq2seq):
    from fmtune.tasks.generation import GenerationSettings, complete

    bundle, _ = loaded(seq2seq)
    torch.manual_seed(0)
    with torch.no_grad():  # weights far from their init: answers that depend on the input (and on its positions)
        for n, p in bundle.model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.2)
    tok = bundle.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("repeat: red", "repeat: one two three four five six", "repeat: cat dog")]
    s = GenerationSettings(max_new_tokens=6, batch_size=8)
    together = complete(bundle.model, tok, prompts, s, "cpu")
    alone = [complete(bundle.model, tok, [p], s, "cpu")[0] for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in alone}) == 3  # (each prompt its own answer)


# --- training, strategies, export, service -------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_run(tiny_t5, s2s_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2s-runs") / "t5-full"
    cfg = gen_cfg(tiny_t5, s2s_files["train"], out, strategy={"name": "full"},
                  train={"lr": 3e-3, "epochs": 6, "patience": None}, data={"test": str(s2s_files["test"])})
    return train_silently(cfg)


def test_a_t5_learns_beats_zero_shot_and_its_folder_generates_in_plain_transformers(t5_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from fmtune.generation import Generator, generate_texts

    run = Path(t5_run["run_dir"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test"]["loss"] < ev["baseline"]["loss"] - 5 and ev["test"]["rougeL"] > ev["baseline"]["rougeL"] + 0.2
    info = json.loads((run / "run.json").read_text())["generation"]
    assert info["encoder_decoder"] and info["decoder_start"] == "<pad>"
    prompts = ["repeat: red dog", "repeat: one two three"]
    ours = [r["answer"] for r in generate_texts(run, prompts, quiet=True)]
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "model").eval()  # no fmtune needed
    tok = AutoTokenizer.from_pretrained(run / "model")
    for p, answer in zip(prompts, ours):
        out = model.generate(**tok(p, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert tok.decode(out[0], skip_special_tokens=True).strip() == answer
    gen = Generator(run)
    info, whole = {}, gen.complete([ROW])[0]
    streamed = "".join(gen.stream(ROW, info=info)).strip()
    assert streamed == whole.text == ours[0] and info == {"tokens": whole.tokens, "stopped": whole.stopped}


def test_a_prompt_too_long_to_answer_loses_its_end_and_is_said_so(t5_run, capsys):
    from fmtune.generation import Generator, generate_texts

    gen = Generator(t5_run["run_dir"])
    long = {**ROW, "prompt": "repeat: " + "red dog " * 400}
    ids, cut = gen.prompt_ids(long)
    assert cut and len(ids) == gen.bundle.max_length and ids[-1] == gen.bundle.tokenizer.eos_token_id
    assert ids[:8] == gen.bundle.tokenizer(long["prompt"])["input_ids"][:8]  # its start kept
    generate_texts(t5_run["run_dir"], [long["prompt"]], max_new_tokens=2)
    assert f"1 prompt(s) longer than {gen.bundle.max_length} tokens lost their end" in capsys.readouterr().err


def test_evaluate_scores_a_t5_run_again_as_training_did(t5_run, capsys):
    from fmtune.cli import main

    run = Path(t5_run["run_dir"])
    trained = json.loads((run / "eval.json").read_text())
    assert main(["evaluate", str(run), "--baseline", "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test"] == pytest.approx(trained["test"], abs=1e-6)
    assert again["baseline"] == pytest.approx(trained["baseline"], abs=1e-6)


@pytest.mark.slow  # two subprocess runs (~25 s), as the causal LM's
def test_a_killed_t5_run_resumes_to_the_same_adapter(tiny_t5, s2s_files, tmp_path):
    killed_run_resumes_the_same(tiny_t5, s2s_files["train"], tmp_path)


def test_a_lora_bart_merges_into_a_folder_transformers_loads_without_peft(tiny_bart, s2s_files, tmp_path):
    import peft
    from transformers import AutoModelForSeq2SeqLM

    from fmtune.exporter import export
    from fmtune.generation import generate_texts

    cfg = gen_cfg(tiny_bart, s2s_files["train"], tmp_path / "lora", train={"lr": 1e-2, "epochs": 2, "metric": "loss"})
    summary = api.train(cfg, quiet=True, report=False)
    model_dir = Path(summary["run_dir"]) / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert {"q_proj", "v_proj", "fc1", "fc2"} <= set(adapter["target_modules"])
    assert summary["best_step"] > 0
    res = export(summary["run_dir"], tmp_path / "merged", merge=True, quiet=True)
    assert res["kind"] == "merged" and res["same_greedy_answers"] == res["checked_prompts"] > 0
    assert type(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")).__name__ == "BartForConditionalGeneration"
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart)
    assert isinstance(peft.PeftModel.from_pretrained(base, model_dir), peft.PeftModelForSeq2SeqLM)
    assert isinstance(generate_texts(summary["run_dir"], ["repeat: cat"], quiet=True)[0]["answer"], str)


@pytest.mark.parametrize("strategy", ["dora", "ia3", "last_n"])
def test_every_seq2seq_strategy_trains_saves_and_answers(tiny_t5, s2s_files, tmp_path, strategy):
    from fmtune.generation import generate_texts
    from fmtune.models import build

    cfg = gen_cfg(tiny_t5, s2s_files["train"], tmp_path / strategy, strategy={"name": strategy, "n": 1},
                  train={"epochs": 1, "lr": 1e-2, "metric": "loss"})
    summary = api.train(cfg, quiet=True, report=False)
    assert summary["best_step"] > 0
    saved = build.load(Path(summary["run_dir"]) / "model")
    if strategy == "last_n":  # the decoder's last block and its final norm trained; the encoder and block 0 not
        before, _ = loaded(tiny_t5)
        was = dict(before.model.named_parameters())
        changed = {n for n, p in saved.model.named_parameters() if not torch.equal(p, was[n])}
        assert changed and all(n.startswith(("decoder.block.1.", "decoder.final_layer_norm")) for n in changed)
    else:
        assert saved.adapter == strategy
    assert isinstance(generate_texts(summary["run_dir"], ["repeat: cat"], quiet=True)[0]["answer"], str)


def test_the_openai_chat_endpoint_answers_from_a_t5_run(t5_run):
    from fastapi.testclient import TestClient

    from fmtune.generation import Generator
    from fmtune.serve import Limits, create_app

    gen = Generator(t5_run["run_dir"])
    expected = gen.answer([ROW])[0]
    with TestClient(create_app(gen, Limits(max_new_tokens=16))) as client:
        r = client.post("/v1/completions", json={"model": "run", "prompt": "repeat: red dog", "max_tokens": 12})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip() == expected
        assert client.post("/generate", json={"prompt": ["repeat: red dog", "repeat: cat"]}).json()["answers"][0] == \
            expected  # (batched with another prompt: right padding changes nothing)


NUMBERS = "zero one two three four five six seven eight nine".split()


def number_rows(n: int, seed: int) -> list[dict]:
    """A toy translation, number words -> digits ("two four" -> "2 4"), as {source, target} rows (a known layout)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
        out.append({"source": " ".join(NUMBERS[i] for i in k), "target": " ".join(map(str, k))})
    return out


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory) -> Path:
    """A 2+2-layer Marian (opus-mt's architecture) with its own tokenizer: SentencePiece models trained here, one
    for the source language and one for the target, and the shared vocabulary, as opus-mt folders hold them."""
    import io

    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    d = tmp_path_factory.mktemp("tiny-marian")
    rows = number_rows(400, 0)
    vocab = {"</s>": 0, "<unk>": 1}
    for side, size in (("source", 40), ("target", 24)):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter([r[side] for r in rows]), model_writer=buf,
                                       vocab_size=size, model_type="unigram", character_coverage=1.0, pad_id=-1,
                                       bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, minloglevel=2)
        (d / f"{side}.spm").write_bytes(buf.getvalue())
        sp = spm.SentencePieceProcessor(model_file=str(d / f"{side}.spm"))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("Recommended: pip install sacremoses")
        tok = MarianTokenizer(source_spm=str(d / "source.spm"), target_spm=str(d / "target.spm"),
                              vocab=str(d / "vocab.json"))
    tok.save_pretrained(d)
    cfg = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MarianMTModel(cfg).save_pretrained(d)
    return d


def test_a_marian_translator_learns_its_targets_in_the_target_languages_vocabulary(tiny_marian, tmp_path):
    """opus-mt's layout: a source and a target SentencePiece model. The completion is tokenised as a target
    (transformers' text_target): the digits are pieces of the target model only, and the answers decode to them."""
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", number_rows(k, s)) for n, k, s in (("train", 200, 1),
                                                                                         ("test", 24, 2))}
    cfg = gen_cfg(tiny_marian, files["train"], tmp_path / "run", strategy={"name": "full"},
                  train={"lr": 3e-3, "epochs": 4, "patience": None}, data={"test": str(files["test"])})
    ev = train_silently(cfg, report=False)["eval"]
    assert ev["test"]["loss"] < ev["baseline"]["loss"] - 1
    answers = [json.loads(x)["fine_tuned"] for x in (tmp_path / "run" / "test_answers.jsonl").read_text().splitlines()]
    assert any(answers) and all(re.fullmatch(r"[0-9 ]*", a) for a in answers), answers


# --- errors --------------------------------------------------------------------------------------------

def test_what_an_encoder_decoder_cannot_do_is_refused_by_name(tiny_t5, s2s_files, tmp_path):
    from conftest import save_tiny_whisper

    from fmtune.tasks.generation import Generation, read_rows

    write_jsonl(tmp_path / "text.jsonl", [{"text": "just some text"}])
    with pytest.raises(DataError, match=r"text\.jsonl: line 1: a plain \{\"text\"\} row .* encoder-decoder"):
        text = str(tmp_path / "text.jsonl")
        api.train(gen_cfg(tiny_t5, Path(text), tmp_path / "r1", data={"val": text}), quiet=True)
    with pytest.raises(ConfigError, match="strategy prompt does not apply to an encoder-decoder"):
        api.train(gen_cfg(tiny_t5, s2s_files["train"], tmp_path / "r2", strategy={"name": "prompt"}), quiet=True)
    with pytest.raises(ConfigError, match="train.packing: .* is an encoder-decoder"):
        api.train(gen_cfg(tiny_t5, s2s_files["train"], tmp_path / "r3", train={"packing": True}), quiet=True)
    bundle, cfg = loaded(tiny_t5)
    with pytest.raises(ConfigError, match="task.train_on_prompt: an encoder-decoder reads the prompt"):
        Generation(train_on_prompt=True).dataset(read_rows(s2s_files["test"], cfg.data), bundle, cfg.data)
    whisper = save_tiny_whisper(tmp_path / "whisper")
    with pytest.raises(ModelError, match="whisper encoder-decoder whose encoder does not read text"):
        loaded(whisper)


def test_a_prompt_over_max_length_is_an_error_or_loses_its_end_but_keeps_its_eos(tiny_t5, tmp_path):
    from fmtune.generation import Generator  # noqa: F401  (the verbs load it)
    from fmtune.tasks.generation import Generation, read_rows

    long = {"prompt": "repeat: " + " ".join(["red dog"] * 30), "completion": "red"}
    write_jsonl(tmp_path / "long.jsonl", [long])
    bundle, cfg = loaded(tiny_t5, model={"max_length": 16})
    df = read_rows(tmp_path / "long.jsonl", cfg.data)
    with pytest.raises(DataError, match=r"long\.jsonl: line 1: \d+ prompt tokens .* model.max_length 16 for the "
                                        "prompt.*task.truncate"):
        Generation().dataset(df, bundle, cfg.data)
    with pytest.warns(UserWarning, match="1 example"):
        ds, _ = Generation(truncate=True).dataset(df, bundle, cfg.data)
    tok = bundle.tokenizer
    assert len(ds.prompts[0]) == 16 and ds.prompts[0][-1] == tok.eos_token_id
    assert ds.prompts[0][:15] == tok(long["prompt"])["input_ids"][:15]  # its start kept: the end went


@pytest.mark.slow
def test_bert2bert_from_real_minilm_weights_learns_to_summarise_real_functions(tmp_path):
    """No seq2seq weights ship offline; what does: MiniLM's, composed as transformers' EncoderDecoderModel (the
    BERT2BERT recipe: pretrained encoder and decoder, fresh cross-attention; model_type "encoder-decoder", a
    WordPiece tokenizer whose [SEP] ends the targets and whose [CLS] starts the decoder). Fine-tuned on real
    standard-library functions -> their docstrings' first sentence: far lower loss and higher ROUGE-L than the
    untrained composition, and an export transformers loads as the same answers (checked by the export)."""
    from transformers import AutoTokenizer, EncoderDecoderModel

    from fmtune.exporter import export
    from fmtune.zoo.datasets import export as export_data
    from fmtune.zoo.models import resolve

    _, minilm = resolve("minilm-l6")
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(minilm), str(minilm))
    tok = AutoTokenizer.from_pretrained(minilm)
    model.config.decoder_start_token_id, model.config.pad_token_id = tok.cls_token_id, tok.pad_token_id
    model.save_pretrained(tmp_path / "bert2bert")
    tok.save_pretrained(tmp_path / "bert2bert")
    files = export_data("stdlib-docstrings", tmp_path / "data", sizes=(240, 32, 32), seed=0)
    cfg = config.from_dict({
        "model": {"name": str(tmp_path / "bert2bert"), "max_length": 256},
        "task": {"type": "generation", "truncate": True}, "strategy": {"name": "full"},
        "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"]),
                 "input_column": "code", "target_column": "summary"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-4, "patience": None},
        "eval": {"samples": 8, "test_samples": 32, "max_new_tokens": 24}, "out": str(tmp_path / "run")})
    ev = train_silently(cfg, report=False)["eval"]
    assert ev["test"]["loss"] < ev["baseline"]["loss"] - 3
    assert ev["test"]["rougeL"] > ev["baseline"]["rougeL"] + 0.03
    res = export(tmp_path / "run", tmp_path / "export", quiet=True)
    assert res["same_greedy_answers"] == res["checked_prompts"] > 0


def test_a_model_whose_own_generate_fails_is_named_in_one_line(tiny_t5, monkeypatch):
    """transformers 5.25's generate fails on some architectures (ProphetNet: "position_ids are incorrect"; Switch
    Transformers: an IndexError in its cache): said as a ModelError naming the model type and the cause."""
    from fmtune.tasks.generation import GenerationSettings, complete

    bundle, _ = loaded(tiny_t5)

    def broken(*a, **kw):
        raise IndexError("list index out of range")

    monkeypatch.setattr(type(bundle.model), "generate", broken)
    with pytest.raises(ModelError, match=r"generate fails on this t5 model \(IndexError: list index out of range\)"):
        complete(bundle.model, bundle.tokenizer, [[5, 6, 1]], GenerationSettings(max_new_tokens=2), "cpu")
