"""Helpers, word pools and real unit factors shared by every generator (stdlib only)."""

from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import random
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

# Small helpers

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _near_int(x: float) -> bool:
    return abs(x - round(x)) < 1e-9 * max(1.0, abs(x))


def fmt(x: float | int | Decimal, places: int = 4) -> str:
    """A number for prose: integers plainly, others rounded to `places` decimals without trailing zeros."""
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if _near_int(x):
        return str(int(round(x)))
    text = f"{x:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def num(x: float | int | Decimal, places: int = 4) -> int | float:
    """A number for JSON: an int when integral, else a float rounded to `places` decimals."""
    if isinstance(x, int):
        return x
    x = float(x)
    if _near_int(x):
        return int(round(x))
    return round(x, places)


def is_rounded(x: float | int, places: int = 4) -> bool:
    """True when showing x with `places` decimals loses something (so the prose says 'about' / uses ≈)."""
    return isinstance(x, float) and abs(round(x, places) - x) > 1e-9 * max(1.0, abs(x))


def money(d: Decimal) -> str:
    return str(d.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def date_words(d: dt.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def random_date(rng: random.Random, start_year: int = 2000, end_year: int = 2030) -> dt.date:
    start = dt.date(start_year, 1, 1).toordinal()
    end = dt.date(end_year, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def join_words(items: list[str], conj: str = "and") -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def is_prime(n: int) -> bool:
    return n >= 2 and prime_factors(n) == [n]


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# Safe arithmetic evaluation (used for the calculator tool and to check our own expressions)

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.FloorDiv: operator.floordiv,
}


def safe_eval(expression: str) -> int | float:
    """Evaluate + - * / // % ** and parentheses over numeric literals; anything else raises ValueError."""

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 8:
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        raise ValueError(f"unsupported expression: {ast.dump(node)}")

    return ev(ast.parse(expression, mode="eval"))


# Units (real conversion factors)

# Factor to the SI base unit (metre, kilogram). Temperatures are handled separately.
LENGTH = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "yd": 0.9144, "mi": 1609.344}
MASS = {"g": 0.001, "kg": 1.0, "oz": 0.028349523125, "lb": 0.45359237}
TEMPERATURE = ("celsius", "fahrenheit", "kelvin")
UNIT_CODES = list(LENGTH) + list(MASS) + list(TEMPERATURE)

UNIT_WORDS = {  # code -> (singular, plural)
    "mm": ("millimetre", "millimetres"),
    "cm": ("centimetre", "centimetres"),
    "m": ("metre", "metres"),
    "km": ("kilometre", "kilometres"),
    "in": ("inch", "inches"),
    "ft": ("foot", "feet"),
    "yd": ("yard", "yards"),
    "mi": ("mile", "miles"),
    "g": ("gram", "grams"),
    "kg": ("kilogram", "kilograms"),
    "oz": ("ounce", "ounces"),
    "lb": ("pound", "pounds"),
    "celsius": ("degree Celsius", "degrees Celsius"),
    "fahrenheit": ("degree Fahrenheit", "degrees Fahrenheit"),
    "kelvin": ("kelvin", "kelvin"),
}

# Pairs people actually ask about (from, to); both directions are generated.
UNIT_PAIRS = [
    ("km", "mi"), ("m", "ft"), ("cm", "in"), ("m", "yd"), ("mm", "in"), ("km", "m"), ("ft", "in"), ("mi", "ft"),
    ("kg", "lb"), ("g", "oz"), ("kg", "g"), ("lb", "oz"),
    ("celsius", "fahrenheit"), ("celsius", "kelvin"), ("fahrenheit", "kelvin"),
]  # fmt: skip


def unit_word(code: str, value: float | int) -> str:
    singular, plural = UNIT_WORDS[code]
    return singular if value == 1 else plural


def convert(value: float, src: str, dst: str) -> float:
    if src in LENGTH:
        return value * LENGTH[src] / LENGTH[dst]
    if src in MASS:
        return value * MASS[src] / MASS[dst]
    kelvin = {"celsius": value + 273.15, "fahrenheit": (value - 32) * 5 / 9 + 273.15, "kelvin": value}[src]
    return {"celsius": kelvin - 273.15, "fahrenheit": (kelvin - 273.15) * 9 / 5 + 32, "kelvin": kelvin}[dst]


def conversion_formula(value: float | int, src: str, dst: str) -> str:
    """A short human explanation of the factor used."""
    v = fmt(value)
    if src in LENGTH or src in MASS:
        table = LENGTH if src in LENGTH else MASS
        ratio = table[src] / table[dst]
        if ratio >= 1:
            return f"1 {unit_word(src, 1)} = {fmt(ratio, 6)} {unit_word(dst, 2)}, so multiply: {v} × {fmt(ratio, 6)}"
        inverse = table[dst] / table[src]
        return f"1 {unit_word(dst, 1)} = {fmt(inverse, 6)} {unit_word(src, 2)}, so divide: {v} / {fmt(inverse, 6)}"
    formulas = {
        ("celsius", "fahrenheit"): f"°F = °C × 9/5 + 32 = {v} × 9/5 + 32",
        ("fahrenheit", "celsius"): f"°C = (°F − 32) × 5/9 = ({v} − 32) × 5/9",
        ("celsius", "kelvin"): f"K = °C + 273.15 = {v} + 273.15",
        ("kelvin", "celsius"): f"°C = K − 273.15 = {v} − 273.15",
        ("fahrenheit", "kelvin"): f"K = (°F − 32) × 5/9 + 273.15 = ({v} − 32) × 5/9 + 273.15",
        ("kelvin", "fahrenheit"): f"°F = (K − 273.15) × 9/5 + 32 = ({v} − 273.15) × 9/5 + 32",
    }
    return formulas[(src, dst)]


def wrong_conversion(value: float, src: str, dst: str) -> float:
    """A plausible mistake: the factor applied the wrong way round, or a forgotten offset for temperatures."""
    if src in LENGTH or src in MASS:
        table = LENGTH if src in LENGTH else MASS
        return value * table[dst] / table[src]
    if {src, dst} == {"celsius", "fahrenheit"}:
        return value * 9 / 5 if src == "celsius" else value * 5 / 9
    if "kelvin" in (src, dst) and "celsius" in (src, dst):
        return value - 273.15 if src == "celsius" else value + 273.15
    return convert(value, src, dst) + 32


def random_unit_question(rng: random.Random) -> tuple[float | int, str, str]:
    src, dst = rng.choice(UNIT_PAIRS)
    if rng.random() < 0.5:
        src, dst = dst, src
    if src in TEMPERATURE:
        low, high = {"celsius": (-30, 45), "fahrenheit": (-20, 110), "kelvin": (230, 320)}[src]
        value = rng.randint(low, high)
    elif rng.random() < 0.3:
        value = rng.randint(1, 99) + rng.choice([0.5, 0.25, 0.75, 0.2])
    else:
        value = rng.choice([1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 42, 50, 100, 150, 250, 500, 1000])
    return value, src, dst


# Word pools (our own)

NAMES = [
    "Ana", "Ben", "Chloé", "Dmitri", "Emma", "Farah", "Gustavo", "Hana", "Ivan", "José", "Kofi", "Lena", "Mei",
    "Nadia", "Omar", "Priya", "Quinn", "Raúl", "Søren", "Tomás", "Uma", "Vera", "Wei", "Yusuf", "Zoë", "Łukasz",
    "Björn", "Anaïs", "Hiroshi", "Aarav",
]  # fmt: skip
ITEMS = [
    ("notebooks", "notebook"), ("pens", "pen"), ("apples", "apple"), ("tickets", "ticket"), ("mugs", "mug"),
    ("candles", "candle"), ("plants", "plant"), ("batteries", "battery"), ("posters", "poster"), ("scarves", "scarf"),
]  # fmt: skip
ASCII_WORDS = [
    "apple", "banana", "cherry", "delta", "echo", "falcon", "garden", "harbor", "island", "jungle", "kettle", "lemon",
    "mango", "nectar", "orbit", "pepper", "quartz", "river", "saddle", "tiger", "umbrella", "velvet", "walnut",
    "yogurt", "zebra", "copper", "meadow", "lantern", "puzzle", "rocket", "violet", "canyon", "ember", "glacier",
    "harvest", "marble", "oasis", "pebble", "thunder", "willow", "anchor", "biscuit", "comet", "dune", "fern",
]  # fmt: skip
UNICODE_WORDS = [
    "café", "naïve", "crème", "jalapeño", "façade", "über", "smörgåsbord", "piñata", "東京", "大阪", "京都", "北京",
    "上海", "こんにちは", "ありがとう", "🍎", "🚀", "🌟", "Zürich", "São Paulo",
]  # fmt: skip
LETTER_WORDS = [
    "strawberry", "mississippi", "banana", "bookkeeper", "committee", "parallel", "occurrence", "assessment",
    "possession", "referee", "balloon", "tomorrow", "engineering", "successful", "abracadabra", "hippopotamus",
    "necessary", "millennium", "accommodation", "embarrassment", "cinnamon", "raspberry", "pepperoni", "coffee",
    "volleyball", "sassafras", "lollipop", "barracuda", "independence", "entrepreneur",
]  # fmt: skip
UNICODE_COUNT_STRINGS = ["crème brûlée", "éléphant élégant", "señor ñandú", "über grün", "été à Genève"]
EMOJI = ["🍎", "🍌", "🍇", "🍕", "🍔", "🌮", "🚀", "🌟", "🎉", "🐍", "🐱", "🐶"]
CJK_STRINGS = ["こんにちは", "東京タワー", "你好世界", "北京烤鸭", "ありがとう", "大阪城", "上海外滩", "山"]
PHRASE_WORDS = [
    "user", "account", "id", "max", "retry", "count", "http", "request", "timeout", "file", "path", "name", "total",
    "price", "order", "item", "last", "login", "date", "cache", "size", "default", "config", "value", "error",
    "message", "queue", "length", "start", "time",
]  # fmt: skip
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with one step",
    "practice makes progress",
    "small steps every day add up",
    "read the error message twice",
    "fine tuning needs clean data",
    "the early bird catches the worm",
    "measure twice and cut once",
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful assistant. Double-check every calculation before answering.",
    "You are a patient tutor who shows the working.",
    "You are a precise assistant. Put the final answer at the end.",
    "You are a friendly assistant. Keep answers short and correct.",
    "你是一个乐于助人的助手。",
]


# Instruction tasks: each returns a Task with the conversation turns and a plausible wrong final answer


@dataclass
class Task:
    kind: str
    turns: list[tuple[str, str]]  # (user, assistant) exchanges
    wrong: str  # a plausible but wrong answer to the last user turn
    topic: str = "this"  # used by the rambling non-answer
