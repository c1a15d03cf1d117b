"""Instruction tasks with computed answers: word problems, arithmetic, units, primes, GCD, numerals.

Each returns a Task with the conversation turns and a plausible wrong final answer.
"""

from __future__ import annotations

import math
import random
from decimal import ROUND_HALF_UP, Decimal

from .common import (
    ITEMS,
    NAMES,
    Task,
    conversion_formula,
    convert,
    fmt,
    is_prime,
    is_rounded,
    money,
    prime_factors,
    random_unit_question,
    unit_word,
    wrong_conversion,
)


def task_shopping(rng: random.Random) -> Task:
    name = rng.choice(NAMES)
    plural, _ = rng.choice(ITEMS)
    qty = rng.randint(2, 9)
    price = Decimal(rng.randint(60, 1450)) / 100
    total = price * qty
    bill = Decimal(next(b for b in (5, 10, 20, 50, 100, 200) if b > total))
    if rng.random() < 0.4 and bill < 100:
        bill = bill * 2
    change = bill - total
    q = f"{name} buys {qty} {plural} at ${money(price)} each and pays with a ${bill} bill. How much change is due?"
    a = (
        f"Cost: {qty} × ${money(price)} = ${money(total)}.\n"
        f"Change: ${bill} − ${money(total)} = ${money(change)}.\n"
        f"Answer: ${money(change)}"
    )
    wrong_total = price * (qty - 1)
    w = (
        f"Cost: {qty} × ${money(price)} = ${money(wrong_total)}.\n"
        f"Change: ${bill} − ${money(wrong_total)} = ${money(bill - wrong_total)}.\n"
        f"Answer: ${money(bill - wrong_total)}"
    )
    return Task("word_problem", [(q, a)], w, "making change")


def task_speed(rng: random.Random) -> Task:
    speed = rng.choice([40, 48, 60, 72, 80, 88, 96, 100, 120, 140])
    hours = rng.randint(1, 5)
    minutes = rng.choice([15, 30, 45])
    vehicle = rng.choice(["A train", "A bus", "A cyclist on an e-bike", "A car", "A ferry"])
    if vehicle == "A cyclist on an e-bike":
        speed = rng.choice([20, 24, 28, 32])
    dist = Decimal(speed) * (hours + Decimal(minutes) / 60)
    q = f"{vehicle} travels at {speed} km/h for {hours} h {minutes} min. How far does it go?"
    frac = Decimal(minutes) / 60
    a = (
        f"{minutes} min = {fmt(frac)} h, so the time is {fmt(hours + frac)} h.\n"
        f"Distance = {speed} km/h × {fmt(hours + frac)} h = {fmt(dist)} km.\n"
        f"Answer: {fmt(dist)} km"
    )
    bad_time = Decimal(f"{hours}.{minutes}")
    w = (
        f"The time is {bad_time} h.\n"
        f"Distance = {speed} km/h × {bad_time} h = {fmt(speed * bad_time)} km.\n"
        f"Answer: {fmt(speed * bad_time)} km"
    )
    return Task("word_problem", [(q, a)], w, "travel distances")


def task_share(rng: random.Random) -> Task:
    n = rng.randint(3, 9)
    each = rng.randint(3, 25)
    rem = rng.randint(1, n - 1)
    total = n * each + rem
    thing = rng.choice(["marbles", "stickers", "cookies", "cards", "coins", "seeds"])
    name = rng.choice(NAMES)
    q = f"{name} shares {total} {thing} equally among {n} friends. How many does each get, and how many are left?"
    a = (
        f"{total} ÷ {n} = {each} remainder {rem} (because {n} × {each} = {n * each}).\n"
        f"Each friend gets {each}, and {rem} left over."
    )
    w = f"{total} ÷ {n} = {each + 1} remainder {rem}.\nEach friend gets {each + 1}, and {rem} left over."
    return Task("word_problem", [(q, a)], w, "sharing things out")


def task_discount(rng: random.Random) -> Task:
    price = Decimal(rng.choice(range(20, 400, 5)))
    pct = rng.choice([5, 10, 15, 20, 25, 30, 35, 40, 50])
    item = rng.choice(["jacket", "lamp", "pair of boots", "backpack", "desk chair", "kettle", "bicycle helmet"])
    off = price * pct / 100
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?"
    a = f"Discount: {pct}% of ${price} = ${money(off)}.\nSale price: ${price} − ${money(off)} = ${money(price - off)}."
    w = f"Discount: {pct}% of ${price} = ${money(off)}.\nSale price: ${price} + ${money(off)} = ${money(price + off)}."
    return Task("word_problem", [(q, a)], w, "discounts")


def task_average(rng: random.Random) -> Task:
    k = rng.randint(4, 6)
    scores = [rng.randint(55, 100) for _ in range(k)]
    total = sum(scores)
    mean = Decimal(total) / k
    name = rng.choice(NAMES)
    q = f"{name}'s test scores are {', '.join(map(str, scores))}. What is the average score?"
    mean_text = fmt(mean.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    approx = "=" if mean == mean.quantize(Decimal("0.01")) else "≈"
    a = f"Sum: {' + '.join(map(str, scores))} = {total}.\nAverage: {total} / {k} {approx} {mean_text}."
    bad = (Decimal(total) / (k - 1)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    w = f"Sum: {' + '.join(map(str, scores))} = {total}.\nAverage: {total} / {k - 1} ≈ {fmt(bad)}."
    return Task("word_problem", [(q, a)], w, "averages")


def task_arith(rng: random.Random) -> Task:
    op = rng.choice(["+", "-", "×", "mix"])
    a, b = rng.randint(12, 999), rng.randint(12, 999)
    if op == "+":
        q, val, expr = f"What is {a} + {b}?", a + b, f"{a} + {b}"
    elif op == "-":
        a, b = max(a, b), min(a, b)
        q, val, expr = f"What is {a} − {b}?", a - b, f"{a} − {b}"
    elif op == "×":
        a, b = rng.randint(11, 99), rng.randint(3, 99)
        q, val, expr = f"Compute {a} × {b}.", a * b, f"{a} × {b}"
    else:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 99)
        q, val, expr = f"What is {a} × {b} + {c}?", a * b + c, f"{a} × {b} + {c}"
        ans = f"{a} × {b} = {a * b}, and {a * b} + {c} = {val}.\nAnswer: {val}"
        bad = f"{a} × ({b} + {c}) = {a * (b + c)}.\nAnswer: {a * (b + c)}"
        return Task("arithmetic", [(q, ans)], bad, "arithmetic")
    slip = rng.choice([1, -1, 10, -10])
    return Task("arithmetic", [(q, f"{expr} = {val}")], f"{expr} = {val + slip}", "arithmetic")


def task_percent(rng: random.Random) -> Task:
    p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75, 80])
    n = rng.choice(range(20, 1000, 4))
    val = Decimal(p) * n / 100
    q = f"What is {p}% of {n}?"
    a = f"{p}% of {n} = {p}/100 × {n} = {fmt(val)}."
    w = f"{p}% of {n} = {p}/10 × {n} = {fmt(val * 10)}."
    return Task("arithmetic", [(q, a)], w, "percentages")


MULTILINGUAL = [
    ("Combien font {a} + {b} ?", "{a} + {b} = {r}.", "+"),
    ("Combien font {a} × {b} ?", "{a} × {b} = {r}.", "×"),
    ("¿Cuánto es {a} + {b}?", "{a} + {b} = {r}.", "+"),
    ("¿Cuánto es {a} por {b}?", "{a} × {b} = {r}.", "×"),
    ("Was ist {a} mal {b}?", "{a} × {b} = {r}.", "×"),
    ("Wie viel ist {a} plus {b}?", "{a} + {b} = {r}.", "+"),
    ("{a} 加 {b} 等于多少？", "{a} + {b} = {r}。", "+"),
    ("{a} 乘以 {b} 等于多少？", "{a} × {b} = {r}。", "×"),
    ("{a} たす {b} は？", "{a} + {b} = {r} です。", "+"),
    ("Quanto fa {a} più {b}?", "{a} + {b} = {r}.", "+"),
]


def task_multilingual(rng: random.Random) -> Task:
    q_t, a_t, op = rng.choice(MULTILINGUAL)
    a, b = (rng.randint(10, 500), rng.randint(10, 500)) if op == "+" else (rng.randint(3, 40), rng.randint(3, 40))
    r = a + b if op == "+" else a * b
    return Task("multilingual", [(q_t.format(a=a, b=b), a_t.format(a=a, b=b, r=r))], a_t.format(a=a, b=b, r=r + 1))


def task_units(rng: random.Random) -> Task:
    value, src, dst = random_unit_question(rng)
    res = convert(value, src, dst)
    eq = "≈" if is_rounded(res) else "="
    phr = rng.choice(["Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "What is {v} {s} in {d}?"])
    q = phr.format(v=fmt(value), s=unit_word(src, value), d=unit_word(dst, 2))
    a = (
        f"{conversion_formula(value, src, dst)} {eq} {fmt(res)}.\n"
        f"So {fmt(value)} {unit_word(src, value)} {eq} {fmt(res)} {unit_word(dst, res)}."
    )
    bad = wrong_conversion(value, src, dst)
    w = f"So {fmt(value)} {unit_word(src, value)} ≈ {fmt(bad)} {unit_word(dst, bad)}."
    return Task("unit_conversion", [(q, a)], w, "unit conversions")


def prime_number(rng: random.Random) -> int:
    n = rng.randint(30, 700)
    if rng.random() < 0.5:  # make primes as common as composites
        while not is_prime(n):
            n += 1
    elif n % 2 == 0:
        n += 1
    return n


def prime_turn(rng: random.Random, n: int) -> tuple[str, str, str]:
    """(question, answer, wrong answer) for 'is n prime?'."""
    q = rng.choice(["Is {n} a prime number?", "Is {n} prime?", "Check whether {n} is prime."]).format(n=n)
    root = math.isqrt(n)
    small = [p for p in range(2, root + 1) if is_prime(p)]
    if is_prime(n):
        a = (
            f"Yes. {n} is prime: √{n} ≈ {fmt(math.sqrt(n), 2)}, and none of the primes up to {root} "
            f"({', '.join(map(str, small))}) divides it."
        )
        w = f"No. {n} is divisible by {rng.choice(small)}, so it is not prime."
    else:
        factors = prime_factors(n)
        a = f"No. {n} = {' × '.join(map(str, factors))}, so it is divisible by {factors[0]}."
        w = f"Yes. {n} is prime: it has no divisors other than 1 and itself."
    return q, a, w


def task_prime(rng: random.Random) -> Task:
    q, a, w = prime_turn(rng, prime_number(rng))
    return Task("primes", [(q, a)], w, "prime numbers")


def euclid_steps(a: int, b: int) -> list[str]:
    steps = []
    while b:
        steps.append(f"{a} = {a // b} × {b} + {a % b}")
        a, b = b, a % b
    return steps


def gcd_numbers(rng: random.Random) -> tuple[int, int, int]:
    """(a, b, gcd) with a composite gcd, so 'a smaller common divisor' is a plausible wrong answer."""
    g = rng.choice([4, 6, 8, 9, 10, 12, 14, 15, 18, 21, 24, 28, 36])
    while True:
        x, y = rng.randint(2, 30), rng.randint(2, 30)
        if x != y and math.gcd(x, y) == 1:
            return g * x, g * y, g


def gcd_turn(rng: random.Random, a: int, b: int, g: int) -> tuple[str, str, str]:
    q = rng.choice(["What is the GCD of {a} and {b}?", "Find the greatest common divisor of {a} and {b}."])
    q = q.format(a=a, b=b)
    ans = "Euclid's algorithm:\n" + "\n".join(euclid_steps(max(a, b), min(a, b))) + f"\nSo gcd({a}, {b}) = {g}."
    return q, ans, f"gcd({a}, {b}) = {prime_factors(g)[0]}."


def task_gcd(rng: random.Random) -> Task:
    a, b, g = gcd_numbers(rng)
    if rng.random() < 0.75:
        q, ans, w = gcd_turn(rng, a, b, g)
        return Task("gcd_lcm", [(q, ans)], w, "divisors")
    lcm = a * b // g
    q = f"What is the least common multiple of {a} and {b}?"
    ans = f"gcd({a}, {b}) = {g}, so lcm = {a} × {b} / {g} = {lcm}."
    return Task("gcd_lcm", [(q, ans)], f"lcm = {a} × {b} = {a * b}.", "multiples")


ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"),
         (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]  # fmt: skip


def to_roman(n: int, subtractive: bool = True) -> str:
    out = []
    for value, sym in ROMAN:
        if not subtractive and len(sym) == 2:
            continue
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def task_roman(rng: random.Random) -> Task:
    n = rng.randint(4, 3999) if rng.random() < 0.6 else rng.randint(1900, 2100)
    good = to_roman(n)
    bad = to_roman(n, subtractive=False)
    if bad == good:
        bad = to_roman(n + 1)
    q = rng.choice(["Write {n} in Roman numerals.", "What is {n} as a Roman numeral?"]).format(n=n)
    return Task("roman", [(q, f"{n} = {good}")], f"{n} = {bad}", "Roman numerals")


def task_base(rng: random.Random) -> Task:
    if rng.random() < 0.5:
        n = rng.randint(5, 1023)
        q = f"Convert {n} to binary."
        return Task("number_bases", [(q, f"{n} in binary is {n:b}.")], f"{n} in binary is {n + 1:b}.", "binary")
    if rng.random() < 0.5:
        n = rng.randint(16, 65535)
        q = f"What is {n} in hexadecimal?"
        return Task("number_bases", [(q, f"{n} = 0x{n:X}")], f"{n} = 0x{n - 1:X}", "hexadecimal")
    n = rng.randint(5, 255)
    bits = f"{n:b}"
    q = f"Convert the binary number {bits} to decimal."
    bad = int(bits[::-1], 2)  # read right to left
    bad = n + 1 if bad == n else bad
    return Task("number_bases", [(q, f"{bits} in binary is {n}.")], f"{bits} in binary is {bad}.", "binary")
