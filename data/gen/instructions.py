"""instructions.jsonl: single- and multi-turn tasks drawn by weight, some with a system prompt."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal

from .common import (
    ASCII_WORDS,
    ITEMS,
    NAMES,
    SYSTEM_PROMPTS,
    Task,
    assistant,
    convert,
    fmt,
    is_prime,
    is_rounded,
    money,
    random_date,
    system,
    unit_word,
    user,
    wrong_conversion,
)
from .tasks_math import (
    gcd_numbers,
    gcd_turn,
    prime_number,
    prime_turn,
    task_arith,
    task_average,
    task_base,
    task_discount,
    task_gcd,
    task_multilingual,
    task_percent,
    task_prime,
    task_roman,
    task_share,
    task_shopping,
    task_speed,
    task_units,
)
from .tasks_text import (
    task_add_days,
    task_case,
    task_char_count,
    task_count_letter,
    task_date_diff,
    task_palindrome,
    task_python,
    task_reverse,
    task_sort,
    task_vowels,
    task_weekday,
)

# Multi-turn tasks: 2-3 exchanges that build on each other.


def multi_units(rng: random.Random) -> Task:
    value = rng.choice([2, 3, 5, 8, 10, 12, 20, 42])
    src, d1, d2 = rng.choice([("km", "mi", "m"), ("kg", "lb", "g"), ("m", "ft", "cm"), ("mi", "km", "ft")])
    r1, r2 = convert(value, src, d1), convert(value, src, d2)
    t1 = (
        f"Convert {value} {unit_word(src, value)} to {unit_word(d1, 2)}.",
        f"{value} {unit_word(src, value)} {'≈' if is_rounded(r1) else '='} {fmt(r1)} {unit_word(d1, r1)}.",
    )
    t2 = (
        f"And in {unit_word(d2, 2)}?",
        f"{value} {unit_word(src, value)} {'≈' if is_rounded(r2) else '='} {fmt(r2)} {unit_word(d2, r2)}.",
    )
    turns = [t1, t2]
    wrong = f"{value} {unit_word(src, value)} ≈ {fmt(wrong_conversion(value, src, d2))} {unit_word(d2, 2)}."
    if rng.random() < 0.4:
        turns.append(("Thanks! Which of the two numbers is bigger?", f"{fmt(max(r1, r2))} is bigger."))
        wrong = f"{fmt(min(r1, r2))} is bigger."
    return Task("multi_turn", turns, wrong, "unit conversions")


def multi_gcd_lcm(rng: random.Random) -> Task:
    a, b, g = gcd_numbers(rng)
    q, ans, _ = gcd_turn(rng, a, b, g)
    t2 = ("And their least common multiple?", f"lcm({a}, {b}) = {a} × {b} / {g} = {a * b // g}.")
    return Task("multi_turn", [(q, ans), t2], f"lcm({a}, {b}) = {a * b}.", "multiples")


def multi_sort_reverse(rng: random.Random) -> Task:
    words = rng.sample(ASCII_WORDS, rng.randint(4, 6))
    good = sorted(words)
    turns = [
        (f"Sort these words alphabetically: {', '.join(words)}", ", ".join(good)),
        ("Now give them in reverse order.", ", ".join(reversed(good))),
    ]
    wrong = ", ".join(reversed(words))
    if rng.random() < 0.5:
        turns.append(("How many words start with a vowel?", str(sum(w[0] in "aeiou" for w in words))))
        wrong = str(sum(w[0] in "aeiou" for w in words) + 1)
    return Task("multi_turn", turns, wrong, "sorting")


def multi_prime_next(rng: random.Random) -> Task:
    n = prime_number(rng)
    q, ans, _ = prime_turn(rng, n)
    m = n + 1
    while not is_prime(m):
        m += 1
    bad = m + 1
    while not is_prime(bad):
        bad += 1
    t2 = ("What is the next prime after it?", f"The next prime after {n} is {m}.")
    return Task("multi_turn", [(q, ans), t2], f"The next prime after {n} is {bad}.", "prime numbers")


def multi_days_weeks(rng: random.Random) -> Task:
    d1 = random_date(rng, 2010, 2030)
    d2 = d1 + dt.timedelta(days=rng.randint(20, 900))
    days = (d2 - d1).days
    t1 = (f"How many days are there from {d1.isoformat()} to {d2.isoformat()}?", f"{days} days.")
    t2 = ("How many full weeks is that?", f"{days} days = {days // 7} full weeks and {days % 7} days.")
    if rng.random() < 0.5:
        t3 = ("And how many hours?", f"{days} days × 24 = {days * 24} hours.")
        return Task("multi_turn", [t1, t2, t3], f"{days} days × 24 = {days * 24 - 24} hours.", "dates")
    return Task("multi_turn", [t1, t2], f"{days} days = {days // 7 + 1} full weeks.", "dates")


def multi_word_problem(rng: random.Random) -> Task:
    name = rng.choice(NAMES)
    plural, singular = rng.choice(ITEMS)
    qty = rng.randint(2, 8)
    price = Decimal(rng.randint(100, 900)) / 100
    qty2 = qty + rng.randint(2, 6)
    t1 = (
        f"{name} buys {qty} {plural} at ${money(price)} each. What is the total?",
        f"{qty} × ${money(price)} = ${money(price * qty)}.",
    )
    t2 = (f"What if {name} buys {qty2} instead?", f"{qty2} × ${money(price)} = ${money(price * qty2)}.")
    if rng.random() < 0.5:
        pct = rng.choice([10, 20, 25])
        total = price * qty2
        off = (total * pct / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        t3 = (
            f"And with a {pct}% discount on that total?",
            f"{pct}% of ${money(total)} = ${off}, so ${money(total)} − ${off} = ${money(total - off)}.",
        )
        wrong = f"{pct}% of ${money(total)} = ${off}, so ${money(total)} − ${off} = ${money(total - off + 1)}."
        return Task("multi_turn", [t1, t2, t3], wrong, "discounts")
    return Task("multi_turn", [t1, t2], f"{qty2} × ${money(price)} = ${money(price * (qty2 - 1))}.", "shopping")


SINGLE_TASKS: list[tuple[Callable[[random.Random], Task], int]] = [
    (task_shopping, 14),
    (task_speed, 10),
    (task_share, 10),
    (task_discount, 10),
    (task_average, 10),
    (task_arith, 14),
    (task_percent, 8),
    (task_multilingual, 12),
    (task_units, 20),
    (task_reverse, 12),
    (task_sort, 14),
    (task_count_letter, 14),
    (task_char_count, 6),
    (task_case, 14),
    (task_date_diff, 10),
    (task_weekday, 8),
    (task_add_days, 8),
    (task_python, 20),
    (task_prime, 12),
    (task_gcd, 12),
    (task_roman, 6),
    (task_base, 8),
    (task_palindrome, 6),
    (task_vowels, 6),
]
MULTI_TASKS: list[tuple[Callable[[random.Random], Task], int]] = [
    (multi_units, 8),
    (multi_gcd_lcm, 6),
    (multi_sort_reverse, 6),
    (multi_prime_next, 5),
    (multi_days_weeks, 5),
    (multi_word_problem, 6),
]


def weighted_schedule(rng: random.Random, table, n: int) -> list:
    """A shuffled list of n generators drawn proportionally to their weights (exact counts, then topped up)."""
    total = sum(w for _, w in table)
    out = []
    for fn, w in table:
        out += [fn] * (w * n // total)
    while len(out) < n:
        out.append(rng.choices([fn for fn, _ in table], weights=[w for _, w in table])[0])
    rng.shuffle(out)
    return out


def task_messages(task: Task, sys_prompt: str | None, upto_last_user: bool = False) -> list[dict]:
    msgs = [system(sys_prompt)] if sys_prompt else []
    for i, (u, a) in enumerate(task.turns):
        msgs.append(user(u))
        if not (upto_last_user and i == len(task.turns) - 1):
            msgs.append(assistant(a))
    return msgs


def make_instructions(rng: random.Random, n: int) -> list[dict]:
    table = SINGLE_TASKS + MULTI_TASKS
    rows, seen = [], set()
    for fn in weighted_schedule(rng, table, n):
        while True:
            task = fn(rng)
            key = tuple(u for u, _ in task.turns)
            if key not in seen:
                seen.add(key)
                break
        sys_prompt = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.3 else None
        rows.append({"messages": task_messages(task, sys_prompt)})
    return rows
