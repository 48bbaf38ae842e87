"""Grammar-constrained decoding engines on lmforge's tokenizer: llguidance, outlines-core, xgrammar.

For each engine that imports, and each tokenizer (our byte-level BPE `tokenizer.json`), it measures:

  setup     building the engine's vocabulary/tokenizer object from tokenizer.json (one-off)
  compile   grammar compile time: the first compile in the process ("cold") and the median of
            `--repeats` recompiles with every cache off
  mask      per-step token-mask time (mean, p95, max; plus the first step alone) over `--walks`
            seeded random walks: at each step fill an int32 bitmask, pick an allowed token uniformly,
            advance, until the stop token (<|end|>) is picked
  valid     walks whose decoded text is valid (json.loads + jsonschema for the schema, re.fullmatch
            for the regex, membership for the choice) / walks; walks that emitted a special token
            other than the stop token are counted as invalid and reported
  unsupported-feature handling: how each engine reacts to schema keywords it may not support
  installed size of each engine and of the dependencies it pulls (from the installed metadata)

Grammars: a JSON schema (nested object, enum, array, integer bounds, pattern), the regex
`[A-Z][a-z]{2,8}-[0-9]{3}`, and a choice among "yes", "no", "maybe". JSON is compact (no free
whitespace; separators "," and ":") in every engine, so the walks are comparable.

The stop token is <|end|> (what ends a chat reply); every other special token must never be allowed.

Run (in a venv holding the engines; none of them is an lmforge dependency):

    python benchmarks/grammar_engines.py                         # tokenizers: see --tokenizer
    python benchmarks/grammar_engines.py --tokenizer data/tokenizer/tokenizer.json --walks 20
    python benchmarks/grammar_engines.py --engines llguidance,xgrammar --train-vocab 2048,8192

Without --tokenizer it uses data/tokenizer/tokenizer.json when the tokenizer stage has produced it,
and trains byte-level BPE tokenizers (lmforge.tokenizer.train_bpe) on the bundled raw corpus at the
sizes of --train-vocab (cached under --cache-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.tokenizer import ChatTokenizer, train_bpe  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,8}-[0-9]{3}"
CHOICES = ["yes", "no", "maybe"]
GRAMMARS = {"json": SCHEMA, "regex": REGEX, "choice": CHOICES}

# Schema keywords an engine may not support: (schema, a compact instance that violates only that
# keyword, one that satisfies it). When an engine compiles the schema, the two instances tell
# "enforced" (good accepted, bad refused) from "ignored" (bad accepted too).
UNSUPPORTED = {
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        '{"xa":1}',
        '{"xa":"s"}',
    ),
    "format:hostname": ({"type": "string", "format": "hostname"}, '"not a host!"', '"example.com"'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]", "[1,2]"),
    "not": ({"not": {"type": "string"}}, '"s"', "1"),
    "if/then/else": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
            "then": {"required": ["b"]},
        },
        '{"a":1}',
        '{"a":1,"b":2}',
    ),
    "multipleOf": ({"type": "integer", "multipleOf": 7}, "8", "14"),
    "remote $ref": ({"$ref": "https://example.com/schema.json"}, "1", None),  # "1": any JSON passes
}

DIST = {"llguidance": "llguidance", "outlines-core": "outlines_core", "xgrammar": "xgrammar"}


# ---- engines ------------------------------------------------------------------------------------
# Each adapter: setup(path, ct) builds the vocabulary object; compile(kind, spec) -> compiled grammar;
# matcher(compiled) -> fresh state; fill(m, bitmask) writes the allowed-token bitmask (int32 words,
# bit i of the little-endian stream = token i); advance(m, tok) -> bool; unsupported(schema) -> str.


class LLGuidance:
    name = "llguidance"

    def __init__(self):
        import llguidance
        import llguidance.numpy  # noqa: F401

        self.llg = llguidance

    def setup(self, path: Path, ct: ChatTokenizer) -> None:
        # LLTokenizer takes the tokenizer.json *text* (or a path/name); special tokens are recognized
        # from added_tokens and never match text. eos_token: the id(s) that end generation.
        self.tok = self.llg.LLTokenizer(path.read_text(), n_vocab=ct.vocab_size, eos_token=ct.end_id)

    def grammar(self, kind: str, spec) -> str:
        M = self.llg.LLMatcher
        if kind == "json":
            return M.grammar_from_json_schema(
                spec, overrides={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
            )
        if kind == "regex":
            return M.grammar_from_regex(spec)
        return self.llg.grammar_from("choice", json.dumps(spec))

    def compile(self, kind: str, spec):
        g = self.grammar(kind, spec)
        m = self.llg.LLMatcher(self.tok, g)  # never raises: errors are a state
        if m.is_error():
            raise ValueError(m.get_error())
        return g

    def matcher(self, g):
        return self.llg.LLMatcher(self.tok, g)

    def fill(self, m, bm) -> None:
        self.llg.numpy.fill_next_token_bitmask(m, bm)

    def advance(self, m, tok: int) -> bool:
        return m.consume_token(tok)

    def unsupported(self, schema):
        try:
            g = self.grammar("json", schema)
        except Exception as e:  # noqa: BLE001
            return f"raises {type(e).__name__}: {e}", None
        is_err, msgs = self.llg.LLMatcher.validate_grammar_with_warnings(g, self.tok)
        if is_err:  # LLMatcher(...) itself never raises: is_error()/get_error() say the same
            return "error: " + "; ".join(msgs), None
        return "compiles" + (" with warnings: " + "; ".join(msgs) if msgs else ""), g


class OutlinesCore:
    name = "outlines-core"

    def __init__(self):
        import outlines_core

        self.oc = outlines_core

    def setup(self, path: Path, ct: ChatTokenizer) -> None:
        # Vocabulary(eos_token_id, {token_bytes: [ids]}): keys must be the token's *raw bytes* (a str
        # key is taken as its UTF-8 bytes, so byte-level strings like "Ġthe" would be wrong). Leave
        # every special token out: the eos id is added by the index at accepting states, and any
        # other special token left in would be matched as the literal text "<|bos|>".
        vocab: dict[bytes, list[int]] = {}
        for i, (b, special) in enumerate(ct.token_bytes(range(ct.vocab_size))):
            if not special:
                vocab.setdefault(b, []).append(i)
        self.vocab = self.oc.Vocabulary(ct.end_id, vocab)
        self.eos = ct.end_id

    def regex(self, kind: str, spec) -> str:
        if kind == "json":
            return self.oc.json_schema.build_regex_from_schema(json.dumps(spec), whitespace_pattern="")
        if kind == "regex":
            return spec
        return "(" + "|".join(re.escape(c) for c in spec) + ")"

    def compile(self, kind: str, spec):
        return self.oc.Index(self.regex(kind, spec), self.vocab)  # eager: the whole DFA x vocab

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, m, bm) -> None:
        m.write_mask_into(bm.ctypes.data, bm.size, 4)

    def advance(self, m, tok: int) -> bool:
        if tok == self.eos:  # allowed in the mask at accepting states, but advance(eos) raises
            return m.is_finished()
        try:
            m.advance(tok, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001
            return False

    def unsupported(self, schema):
        try:
            return "compiles", self.compile("json", schema)
        except Exception as e:  # noqa: BLE001
            return f"raises {type(e).__name__}: {e}", None


class XGrammar:
    name = "xgrammar"

    def __init__(self):
        import xgrammar  # imports torch

        self.xgr = xgrammar

    def setup(self, path: Path, ct: ChatTokenizer) -> None:
        # TokenizerInfo(encoded_vocab, BYTE_LEVEL, ...): the vocab as the tokenizer.json strings
        # (byte-level alphabet, "Ġthe"), indexed by id. Special tokens must be given as "" (xgrammar
        # then lists them in special_token_ids and never allows them); given by name, as
        # TokenizerInfo.from_huggingface does, "<|bos|>" etc. are ordinary text and get allowed
        # inside JSON strings.
        enc = ["" if i in ct.special_ids else ct.tok.id_to_token(i) for i in range(ct.vocab_size)]
        self.info = self.xgr.TokenizerInfo(
            enc, self.xgr.VocabType.BYTE_LEVEL, vocab_size=ct.vocab_size, stop_token_ids=[ct.end_id]
        )
        self.compiler = self.xgr.GrammarCompiler(
            self.info, max_threads=os.cpu_count() or 1, cache_enabled=False
        )

    def compile(self, kind: str, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(spec, any_whitespace=False, separators=(",", ":"))
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))

    def matcher(self, cg):
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m, bm) -> None:
        m.fill_next_token_bitmask(bm)  # any DLPack array (numpy here); torch not needed for this

    def advance(self, m, tok: int) -> bool:
        return m.accept_token(tok)

    def unsupported(self, schema):
        try:
            return "compiles", self.compile("json", schema)
        except Exception as e:  # noqa: BLE001
            return f"raises {type(e).__name__}: {e}", None


ENGINES = {"llguidance": LLGuidance, "outlines-core": OutlinesCore, "xgrammar": XGrammar}


# ---- measurement --------------------------------------------------------------------------------
def allowed_ids(bm: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")[:vocab])


def check(kind: str, text: str) -> str | None:
    """None if `text` is a valid output of grammar `kind`, else why not."""
    if kind == "json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            return f"json.loads: {e}"
        try:
            import jsonschema
        except ImportError:
            return None
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(obj))
        return None if err is None else f"jsonschema: {err.message}"
    if kind == "regex":
        return None if re.fullmatch(REGEX, text) else "no fullmatch"
    return None if text in CHOICES else "not a choice"


def walk(eng, compiled, ct: ChatTokenizer, rng, max_steps: int):
    V = ct.vocab_size
    bm = np.full((1, (V + 31) // 32), -1, dtype=np.int32)
    m = eng.matcher(compiled)
    times, toks, status = [], [], "max_steps"
    for _ in range(max_steps):
        bm.fill(0)
        t0 = time.perf_counter()
        eng.fill(m, bm)
        times.append(time.perf_counter() - t0)
        ids = allowed_ids(bm, V)
        if len(ids) == 0:
            status = "empty mask"
            break
        tok = int(rng.choice(ids))
        if not eng.advance(m, tok):
            status = f"token {tok} rejected"
            break
        if tok == ct.end_id:
            status = "ok"
            break
        toks.append(tok)
    return times, toks, status


def accepts(eng, compiled, ct: ChatTokenizer, text: str) -> bool:
    """Does the grammar accept `text` (tokenized the ordinary way) followed by the stop token?"""
    m = eng.matcher(compiled)
    V = ct.vocab_size
    bm = np.full((1, (V + 31) // 32), -1, dtype=np.int32)
    for tok in [*ct.encode(text), ct.end_id]:
        bm.fill(0)
        eng.fill(m, bm)
        if not (bm[0, tok >> 5] >> (tok & 31)) & 1 or not eng.advance(m, tok):
            return False
    return True


def unsupported_report(eng, ct: ChatTokenizer) -> list[str]:
    out = []
    for feat, (schema, bad, good) in UNSUPPORTED.items():
        msg, compiled = eng.unsupported(schema)
        if compiled is not None and bad is not None:
            ok_good = good is None or accepts(eng, compiled, ct, good)
            ok_bad = accepts(eng, compiled, ct, bad)
            verdict = "IGNORED, accepts " + bad if ok_bad else "ENFORCED" if ok_good else ""
            if not ok_good:
                verdict += f"{'; ' if verdict else ''}refuses valid {good}"
            msg += f" -> {verdict}"
        out.append(f"{eng.name:14} {feat:18} {' '.join(msg.split())[:300]}")
    return out


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def bench_engine(eng, path: Path, ct: ChatTokenizer, args) -> tuple[list[dict], dict]:
    rows, notes = [], {"failures": []}
    setups = []
    for _ in range(3):  # median of 3: one-off cost, but a single figure is noisy on a shared machine
        t0 = time.perf_counter()
        eng.setup(path, ct)
        setups.append(time.perf_counter() - t0)
    setup_s = statistics.median(setups)
    for kind, spec in GRAMMARS.items():
        row = {"engine": eng.name, "vocab": ct.vocab_size, "grammar": kind, "setup_ms": setup_s * 1e3}
        try:
            t0 = time.perf_counter()
            compiled = eng.compile(kind, spec)
            row["compile_cold_ms"] = (time.perf_counter() - t0) * 1e3
            warm = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                eng.compile(kind, spec)
                warm.append(time.perf_counter() - t0)
            row["compile_med_ms"] = statistics.median(warm) * 1e3 if warm else float("nan")
        except Exception as e:  # noqa: BLE001
            row["error"] = f"compile: {type(e).__name__}: {e}"
            rows.append(row)
            continue
        rng = np.random.default_rng(args.seed)
        all_t, first_t, steps, valid = [], [], [], 0
        for w in range(args.walks):
            times, toks, status = walk(eng, compiled, ct, rng, args.max_steps)
            all_t += times
            first_t.append(times[0] if times else float("nan"))
            steps.append(len(times))
            text = ct.decode(toks)
            bad = sorted(set(toks) & ct.special_ids)
            why = status if status != "ok" else (f"special tokens {bad}" if bad else check(kind, text))
            if why is None:
                valid += 1
            else:
                notes["failures"].append((f"{eng.name} V={ct.vocab_size} {kind}", w, why, text))
            if args.show and w < args.show:
                print(f"    {eng.name} V={ct.vocab_size} {kind} walk {w} [{status}]: {text[:160]!r}")
        row.update(
            mask_mean_us=statistics.fmean(all_t) * 1e6,
            mask_p95_us=pct(all_t, 95) * 1e6,
            mask_max_us=max(all_t) * 1e6,
            first_mask_us=statistics.median(first_t) * 1e6,
            steps=statistics.fmean(steps),
            valid=f"{valid}/{args.walks}",
        )
        rows.append(row)
    return rows, notes


def dist_sizes(dist_name: str) -> tuple[float, list[str], float]:
    """(installed MB of the distribution, its transitive installed requirements, their MB)."""

    def size(d) -> float:
        return sum((f.size or 0) for f in (d.files or [])) / 1e6

    def reqs(d) -> list[str]:
        out = []
        for r in d.requires or []:
            if "extra ==" in r:
                continue
            name = re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]
            out.append(name)
        return out

    d0 = metadata.distribution(dist_name)
    seen, todo = {}, reqs(d0)
    while todo:
        n = todo.pop()
        key = n.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            d = metadata.distribution(n)
            seen[key] = size(d)
            todo += reqs(d)
        except metadata.PackageNotFoundError:
            seen[key] = float("nan")  # required but not installed
    deps = [f"{k}{' (missing)' if v != v else ''}" for k, v in sorted(seen.items())]
    return size(d0), deps, sum(v for v in seen.values() if v == v)


# ---- tokenizers ---------------------------------------------------------------------------------
def bundled_texts() -> list[str]:
    raw = ROOT / "data" / "raw"
    texts = [b for b in (raw / "tinyshakespeare" / "input.txt").read_text().split("\n\n") if b.strip()]
    for r in json.loads((raw / "instructions" / "instruction-data-with-preference.json").read_text()):
        texts += [r["instruction"], r["input"], r["output"]]
    return texts


def tokenizer_paths(args) -> list[Path]:
    if args.tokenizer:
        return [Path(p) for p in args.tokenizer]
    paths = []
    stage = ROOT / "data" / "tokenizer" / "tokenizer.json"
    if stage.is_file():
        paths.append(stage)
    texts = None
    for v in [int(x) for x in args.train_vocab.split(",") if x]:
        p = Path(args.cache_dir) / f"bpe{v}" / "tokenizer.json"
        if not p.is_file():
            texts = texts or bundled_texts()
            ChatTokenizer(train_bpe(texts, v)).save(p.parent)
        paths.append(p)
    return paths


# ---- report -------------------------------------------------------------------------------------
COLS = [
    ("engine", "engine", "{}"),
    ("vocab", "V", "{}"),
    ("grammar", "grammar", "{}"),
    ("setup_ms", "setup ms", "{:.1f}"),  # median of 3
    ("compile_cold_ms", "compile cold ms", "{:.2f}"),
    ("compile_med_ms", "compile med ms", "{:.2f}"),
    ("first_mask_us", "1st mask us", "{:.0f}"),
    ("mask_mean_us", "mask mean us", "{:.1f}"),
    ("mask_p95_us", "mask p95 us", "{:.1f}"),
    ("mask_max_us", "mask max us", "{:.0f}"),
    ("steps", "steps/walk", "{:.1f}"),
    ("valid", "valid", "{}"),
]


def table(rows: list[dict]) -> str:
    cells = [[h for _, h, _ in COLS]]
    for r in rows:
        if "error" in r:
            cells.append(
                [str(r.get(k, "")) if k in ("engine", "vocab", "grammar") else "" for k, _, _ in COLS]
            )
            cells[-1][3] = r["error"][:80]
            continue
        cells.append([f.format(r[k]) if k in r else "" for k, _, f in COLS])
    w = [max(len(c[i]) for c in cells) for i in range(len(COLS))]
    lines = [
        "  ".join(c[i].rjust(w[i]) if i > 2 else c[i].ljust(w[i]) for i in range(len(COLS))) for c in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", action="append", help="tokenizer.json (repeatable)")
    ap.add_argument("--train-vocab", default="2048,8192", help="without --tokenizer: BPE sizes to train")
    ap.add_argument("--cache-dir", default="/tmp/lmforge-grammar-bench", help="where trained tokenizers go")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of " + ", ".join(ENGINES))
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=20000, help="a walk longer than this counts as failed")
    ap.add_argument("--repeats", type=int, default=3, help="recompiles for the median compile time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print the text of the first N walks")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    engines = []
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        try:
            engines.append(ENGINES[name]())
        except ImportError as e:
            print(f"skip {name}: not importable ({e})")
            continue
        print(f"import {name}: {time.perf_counter() - t0:.2f} s")
    if not engines:
        sys.exit("no engine importable; pip install llguidance outlines-core xgrammar")

    rows, failures = [], []
    for path in tokenizer_paths(args):
        ct = ChatTokenizer.load(path)
        print(f"tokenizer {path} (V={ct.vocab_size}, stop <|end|>={ct.end_id})", flush=True)
        for eng in engines:
            r, notes = bench_engine(eng, path, ct, args)
            rows += r
            failures += notes["failures"]
            print(table(r).split("\n", 2)[-1], flush=True)

    print("\n== figures (mask = fill one int32 bitmask; compile med = recompile, caches off) ==")
    print(table(rows))
    if failures:
        print(f"\n== invalid walks ({len(failures)}; at most 2 shown per row) ==")
        shown: dict[str, int] = {}
        for key, w, why, text in failures:
            shown[key] = shown.get(key, 0) + 1
            if shown[key] <= 2:
                print(f"{key} walk {w}: {why}: {text[:100]!r}")
    print("\n== unsupported schema features (compile outcome -> does the grammar enforce it) ==")
    for eng in engines:  # the last tokenizer's setup is the one in place
        print("\n".join(unsupported_report(eng, ct)), flush=True)
    print("\n== installed size ==")
    for eng in engines:
        mb, deps, deps_mb = dist_sizes(DIST[eng.name])
        ver = metadata.version(DIST[eng.name])
        print(f"{eng.name} {ver}: {mb:.1f} MB; deps {deps_mb:.0f} MB: {', '.join(deps) or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
