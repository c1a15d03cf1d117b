"""Instruction tasks on text, dates and code: reversing, sorting, counting, cases, dates, Python output."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import random

from .common import (
    ASCII_WORDS,
    CJK_STRINGS,
    EMOJI,
    LETTER_WORDS,
    NAMES,
    PHRASE_WORDS,
    SENTENCES,
    UNICODE_COUNT_STRINGS,
    UNICODE_WORDS,
    WEEKDAYS,
    Task,
    date_words,
    random_date,
)


def pick_words(rng: random.Random, k: int, unicode_ok: bool) -> list[str]:
    pool = ASCII_WORDS + (UNICODE_WORDS if unicode_ok else [])
    return rng.sample(pool, k)


def task_reverse(rng: random.Random) -> Task:
    words = pick_words(rng, rng.randint(4, 7), unicode_ok=rng.random() < 0.35)
    q = rng.choice(["Reverse the order of these words: {w}", "List these in reverse order: {w}"]).format(
        w=", ".join(words)
    )
    rev = list(reversed(words))
    bad = rev[:]
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return Task("reverse_list", [(q, ", ".join(rev))], ", ".join(bad), "word order")


def task_sort(rng: random.Random) -> Task:
    if rng.random() < 0.65:
        words = rng.sample(ASCII_WORDS, rng.randint(4, 8))
        q = rng.choice(["Sort these words alphabetically: {w}", "Put these in alphabetical order: {w}"]).format(
            w=", ".join(words)
        )
        good = sorted(words)
    else:
        nums = rng.sample(range(-50, 300), rng.randint(5, 8))
        desc = rng.random() < 0.4
        q = f"Sort these numbers in {'descending' if desc else 'ascending'} order: {', '.join(map(str, nums))}"
        good = [str(x) for x in sorted(nums, reverse=desc)]
    bad = good[:]
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return Task("sort_list", [(q, ", ".join(good))], ", ".join(bad), "sorting")


def task_count_letter(rng: random.Random) -> Task:
    r = rng.random()
    if r < 0.7:
        word = rng.choice(LETTER_WORDS)
        letter = rng.choice(sorted(set(word))) if rng.random() < 0.9 else rng.choice("qxzjkw")
    elif r < 0.85:
        word = rng.choice(UNICODE_COUNT_STRINGS)
        letter = rng.choice([ch for ch in sorted(set(word)) if ch != " "])
    else:
        word = "".join(rng.choice(EMOJI[:5]) for _ in range(rng.randint(5, 9)))
        letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    unit = "character" if not letter.isalpha() else "letter"
    q = f"How many times does the {unit} '{letter}' appear in '{word}'?"
    bad = n - 1 if n > 1 else n + 1
    a = f"'{letter}' appears {n} {'time' if n == 1 else 'times'} in '{word}'."
    w = f"'{letter}' appears {bad} {'time' if bad == 1 else 'times'} in '{word}'."
    return Task("count_letters", [(q, a)], w, "counting letters")


def task_char_count(rng: random.Random) -> Task:
    if rng.random() < 0.6:
        s = rng.choice(CJK_STRINGS)
    else:
        s = "".join(rng.sample(EMOJI, rng.randint(2, 6)))
    q = f"How many characters (Unicode code points) are in '{s}'?"
    return Task("count_letters", [(q, f"'{s}' has {len(s)} characters.")], f"'{s}' has {len(s) + 1} characters.")


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(PHRASE_WORDS, rng.randint(2, 4))


CASES = {
    "snake_case": lambda ws: "_".join(w.lower() for w in ws),
    "camelCase": lambda ws: ws[0].lower() + "".join(w.capitalize() for w in ws[1:]),
    "PascalCase": lambda ws: "".join(w.capitalize() for w in ws),
    "kebab-case": lambda ws: "-".join(w.lower() for w in ws),
    "SCREAMING_SNAKE_CASE": lambda ws: "_".join(w.upper() for w in ws),
}
CASE_CONFUSION = {
    "snake_case": "kebab-case",
    "camelCase": "PascalCase",
    "PascalCase": "camelCase",
    "kebab-case": "snake_case",
    "SCREAMING_SNAKE_CASE": "snake_case",
}


def task_case(rng: random.Random) -> Task:
    if rng.random() < 0.6:
        words = _phrase(rng)
        style = rng.choice(list(CASES))
        q = f"Convert '{' '.join(words)}' to {style}."
        good = CASES[style](words)
        bad = CASES[CASE_CONFUSION[style]](words)
        return Task("string_case", [(q, good)], bad, "naming conventions")
    text = rng.choice(SENTENCES[:5] + UNICODE_COUNT_STRINGS + ["crème brûlée for two", "Ångström units"])
    how = rng.choice(["uppercase", "title case", "lowercase"])
    if how == "lowercase":
        text = text.upper()
    good = {"uppercase": text.upper(), "title case": text.title(), "lowercase": text.lower()}[how]
    bad = {"uppercase": text.title(), "title case": text.capitalize(), "lowercase": text.capitalize()}[how]
    if bad == good:
        bad = good.swapcase()
    return Task("string_case", [(f"Rewrite in {how}: {text}", good)], bad, "letter case")


def task_date_diff(rng: random.Random) -> Task:
    d1 = random_date(rng)
    d2 = d1 + dt.timedelta(days=rng.randint(3, 2000))
    days = (d2 - d1).days
    if rng.random() < 0.5:
        q = f"How many days are there from {d1.isoformat()} to {d2.isoformat()}?"
    else:
        q = f"How many days are there between {date_words(d1)} and {date_words(d2)}?"
    a = f"From {d1.isoformat()} to {d2.isoformat()} is {days} days."
    return Task("dates", [(q, a)], f"From {d1.isoformat()} to {d2.isoformat()} is {days + 1} days.", "dates")


def task_weekday(rng: random.Random) -> Task:
    d = random_date(rng, 1950, 2040)
    q = rng.choice(["What day of the week is {d}?", "Which weekday does {d} fall on?"]).format(d=date_words(d))
    good = WEEKDAYS[d.weekday()]
    bad = WEEKDAYS[(d.weekday() + rng.choice([1, 6])) % 7]
    return Task("dates", [(q, f"{date_words(d)} is a {good}.")], f"{date_words(d)} is a {bad}.", "calendars")


def task_add_days(rng: random.Random) -> Task:
    d = random_date(rng)
    n = rng.randint(10, 400)
    later = rng.random() < 0.7
    res = d + dt.timedelta(days=n if later else -n)
    word = "after" if later else "before"
    q = f"What date is {n} days {word} {d.isoformat()}?"
    a = f"{n} days {word} {d.isoformat()} is {res.isoformat()} ({WEEKDAYS[res.weekday()]}, {date_words(res)})."
    bad = res + dt.timedelta(days=1 if later else -1)
    return Task("dates", [(q, a)], f"{n} days {word} {d.isoformat()} is {bad.isoformat()}.", "dates")


def run_snippet(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # our own generated code only
    return buf.getvalue().rstrip("\n")


def _snippet_pairs(rng: random.Random) -> tuple[str, str]:
    """Return (code, mutant) where the mutant is a plausible misreading of the code."""
    k = rng.randrange(12)
    if k == 0:
        nums = [rng.randint(1, 9) for _ in range(4)]
        code = f"nums = {nums}\nprint(sum(n * n for n in nums))"
        return code, code.replace("n * n", "n * 2")
    if k == 1:
        n = rng.randint(4, 12)
        code = f"total = 0\nfor i in range({n}):\n    total += i\nprint(total)"
        return code, code.replace(f"range({n})", f"range({n + 1})")
    if k == 2:
        word = rng.choice(ASCII_WORDS[:30])
        i = rng.randint(0, 2)
        j = rng.randint(i + 2, len(word))
        code = f's = "{word}"\nprint(s[{i}:{j}])'
        return code, code.replace(f"[{i}:{j}]", f"[{i}:{j + 1}]")
    if k == 3:
        n, m = rng.randint(10, 30), rng.randint(2, 5)
        code = f"print([x for x in range({n}) if x % {m} == 0])"
        return code, code.replace(f"range({n})", f"range(1, {n + 1})")
    if k == 4:
        a, b = rng.randint(20, 99), rng.randint(3, 9)
        code = f"print({a} // {b}, {a} % {b})"
        return code, f"print({a} // {b} + 1, {a} % {b})"
    if k == 5:
        s = rng.choice(SENTENCES)
        code = f'words = "{s}".split()\nprint(len(words), words[-1].upper())'
        return code, code.replace("len(words)", "len(words) - 1")
    if k == 6:
        vals = rng.sample(range(1, 40), 3)
        code = f'd = {{"b": {vals[0]}, "a": {vals[1]}, "c": {vals[2]}}}\nprint(max(d, key=d.get), sum(d.values()))'
        return code, code.replace("max(d, key=d.get)", "max(d)")
    if k == 7:
        word = rng.choice([w for w in ASCII_WORDS if len(w) <= 5])
        code = f'for i, ch in enumerate("{word}"):\n    print(i, ch)'
        return code, code.replace(f'"{word}")', f'"{word}", start=1)')
    if k == 8:
        a = [rng.randint(1, 9) for _ in range(3)]
        b = [rng.randint(1, 9) for _ in range(3)]
        code = f"a = {a}\nb = {b}\nprint([x * y for x, y in zip(a, b)])"
        return code, code.replace("x * y", "x + y")
    if k == 9:
        names = rng.sample(NAMES[:25], 4)
        code = f"names = {names!r}\nprint(sorted(names, key=len))"
        return code, code.replace(", key=len", "")
    if k == 10:
        n = rng.randint(5, 30)
        code = (
            f"n = {n}\nsteps = 0\nwhile n != 1:\n"
            "    n = n // 2 if n % 2 == 0 else 3 * n + 1\n    steps += 1\nprint(steps)"
        )
        return code, code.replace("steps = 0", "steps = 1")
    n = rng.randint(4, 8)
    code = f'print("-".join(str(i * i) for i in range(1, {n})))'
    return code, code.replace(f"range(1, {n})", f"range(1, {n + 1})")


def task_python(rng: random.Random) -> Task:
    while True:
        code, mutant = _snippet_pairs(rng)
        out, bad = run_snippet(code), run_snippet(mutant)
        if out != bad:
            break
    q = f"What does this Python code print?\n```python\n{code}\n```"
    return Task("python_output", [(q, f"It prints:\n```\n{out}\n```")], f"It prints:\n```\n{bad}\n```", "Python")


def task_palindrome(rng: random.Random) -> Task:
    pool = ["level", "rotor", "kayak", "stats", "refer", "civic", "madam", "racecar", "noon", "tenet"]
    word = rng.choice(pool) if rng.random() < 0.5 else rng.choice(ASCII_WORDS)
    yes = word == word[::-1]
    q = f"Is '{word}' a palindrome?"
    same = "the same" if yes else "different"
    a = f"{'Yes' if yes else 'No'}: '{word}' reversed is '{word[::-1]}', which is {same}."
    w = f"{'No' if yes else 'Yes'}, '{word}' is {'not ' if yes else ''}a palindrome."
    return Task("palindrome", [(q, a)], w, "palindromes")


def task_vowels(rng: random.Random) -> Task:
    s = rng.choice(SENTENCES + LETTER_WORDS)
    vowels = [ch for ch in s if ch in "aeiou"]
    q = f"How many vowels (a, e, i, o, u) are in '{s}'?"
    a = f"There are {len(vowels)} vowels in '{s}'."
    return Task("count_letters", [(q, a)], f"There are {len(vowels) - 1} vowels in '{s}'.", "vowels")
