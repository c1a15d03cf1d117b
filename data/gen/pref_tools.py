"""The five calculator-style tools the preference pairs use (their schemas are the training catalog's).

Weather values are a SHA-256 hash of city|date, currency rates a fixed illustrative table, the clock the seeded RNG.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from .common import (
    ASCII_WORDS,
    LETTER_WORDS,
    convert,
    date_words,
    dumps,
    fmt,
    is_rounded,
    join_words,
    num,
    random_unit_question,
    safe_eval,
    unit_word,
)
from .tool_catalog import TRAIN_BY_NAME

# Tools


# The same schemas as the training catalog (one source), in the order the preference rows draw them.
TOOLS = {
    name: TRAIN_BY_NAME[name].schema
    for name in ("get_weather", "convert_units", "calculator", "currency_convert", "get_time_in_timezone")
}
TOOL_NAMES = list(TOOLS)
TOOL_ABILITIES = {
    "get_weather": "look up the (synthetic) weather for a city",
    "convert_units": "convert lengths, masses and temperatures",
    "calculator": "evaluate arithmetic expressions",
    "currency_convert": "convert money between currencies at fixed illustrative rates",
    "get_time_in_timezone": "tell the local time in a timezone",
}

# City -> rough base temperature in °C for the fake weather. The last block is held out for the eval set.
WEATHER_CITIES_TRAIN = {
    "Oslo": 5, "Paris": 13, "Lima": 19, "Tokyo": 16, "Cairo": 24, "Sydney": 18, "Toronto": 8, "Berlin": 10,
    "Madrid": 15, "Mumbai": 28, "Nairobi": 19, "Seoul": 12, "Chicago": 10, "Mexico City": 17, "Istanbul": 15,
    "Bangkok": 29, "Cape Town": 17, "Dublin": 10, "Helsinki": 5, "Lisbon": 17, "Vienna": 11, "Prague": 9,
    "Buenos Aires": 18, "Santiago": 15, "Singapore": 28, "Dubai": 28, "Vancouver": 10, "Denver": 10, "Athens": 19,
    "Rome": 16, "Amsterdam": 10, "Stockholm": 7, "Zürich": 9, "São Paulo": 20, "Kyoto": 15, "Hanoi": 24,
    "Marrakesh": 20, "Anchorage": 2, "Edinburgh": 9, "Melbourne": 16, "Bogotá": 14, "Montréal": 7,
}  # fmt: skip
WEATHER_CITIES_EVAL = {
    "Reykjavík": 4, "Tallinn": 6, "Wellington": 13, "Quito": 14, "Porto": 15, "Kraków": 8, "Accra": 27,
    "Da Nang": 26, "Valparaíso": 15, "Tbilisi": 13, "Ljubljana": 11, "Perth": 19, "Havana": 25, "Busan": 15,
    "Manila": 28, "Karachi": 26, "Dhaka": 26,
}  # fmt: skip

# City -> (IANA timezone, fixed standard offset in minutes). The last block is held out for the eval set.
TZ_CITIES_TRAIN = {
    "Tokyo": ("Asia/Tokyo", 540), "London": ("Europe/London", 0), "New York": ("America/New_York", -300),
    "Mumbai": ("Asia/Kolkata", 330), "Sydney": ("Australia/Sydney", 600), "Berlin": ("Europe/Berlin", 60),
    "Los Angeles": ("America/Los_Angeles", -480), "Shanghai": ("Asia/Shanghai", 480),
    "São Paulo": ("America/Sao_Paulo", -180), "Kathmandu": ("Asia/Kathmandu", 345), "Nairobi": ("Africa/Nairobi", 180),
    "Auckland": ("Pacific/Auckland", 720), "Paris": ("Europe/Paris", 60), "Chicago": ("America/Chicago", -360),
    "Moscow": ("Europe/Moscow", 180), "Dubai": ("Asia/Dubai", 240), "Singapore": ("Asia/Singapore", 480),
    "Seoul": ("Asia/Seoul", 540), "Cairo": ("Africa/Cairo", 120), "Mexico City": ("America/Mexico_City", -360),
    "Honolulu": ("Pacific/Honolulu", -600), "Lagos": ("Africa/Lagos", 60), "Jakarta": ("Asia/Jakarta", 420),
    "Bangkok": ("Asia/Bangkok", 420), "Tehran": ("Asia/Tehran", 210),
}  # fmt: skip
TZ_CITIES_EVAL = {
    "Bogotá": ("America/Bogota", -300), "Manila": ("Asia/Manila", 480), "Karachi": ("Asia/Karachi", 300),
    "Dhaka": ("Asia/Dhaka", 360), "Athens": ("Europe/Athens", 120), "Madrid": ("Europe/Madrid", 60),
    "Buenos Aires": ("America/Argentina/Buenos_Aires", -180), "Lima": ("America/Lima", -300),
}  # fmt: skip

# Illustrative units of currency per 1 USD. Fixed, rounded, NOT real market data.
RATES_PER_USD = {
    "USD": "1", "EUR": "0.92", "GBP": "0.79", "JPY": "151", "CNY": "7.2", "INR": "83", "CHF": "0.9", "CAD": "1.36",
    "AUD": "1.52", "BRL": "5", "MXN": "17", "SEK": "10.5", "KRW": "1350", "NOK": "10.6", "ZAR": "18.5", "SGD": "1.35",
}  # fmt: skip
CURRENCY_NAMES = {
    "USD": "US dollars", "EUR": "euros", "GBP": "British pounds", "JPY": "Japanese yen", "CNY": "Chinese yuan",
    "INR": "Indian rupees", "CHF": "Swiss francs", "CAD": "Canadian dollars", "AUD": "Australian dollars",
    "BRL": "Brazilian reais", "MXN": "Mexican pesos", "SEK": "Swedish kronor", "KRW": "South Korean won",
    "NOK": "Norwegian kroner", "ZAR": "South African rand", "SGD": "Singapore dollars",
}  # fmt: skip

WEATHER_CONDITIONS = ["sunny", "partly cloudy", "cloudy", "rainy", "windy", "foggy"]


@dataclass
class Call:
    name: str
    args: dict
    result: dict
    summary: str  # one English sentence describing the result
    extra: dict = field(default_factory=dict)


def weather_call(city: str, base: int, date: str | None = None, unit: str | None = None) -> Call:
    digest = hashlib.sha256(f"{city}|{date or 'today'}".encode()).digest()
    temp_c = base + digest[0] % 13 - 6
    humidity = 30 + digest[1] % 66
    pool = WEATHER_CONDITIONS + (["snowy"] if temp_c <= 1 else [])
    condition = pool[digest[2] % len(pool)]
    args: dict = {"city": city}
    if date:
        args["date"] = date
    if unit:
        args["unit"] = unit
    temp = round(temp_c * 9 / 5 + 32) if unit == "fahrenheit" else temp_c
    result = {"city": city}
    if date:
        result["date"] = date
    result.update({"temperature": temp, "unit": unit or "celsius", "condition": condition, "humidity": humidity})
    deg = "°F" if unit == "fahrenheit" else "°C"
    if date:
        summary = f"The forecast for {city} on {date} is {temp} {deg} and {condition}, with {humidity}% humidity."
    else:
        summary = f"It's {temp} {deg} and {condition} in {city}, with {humidity}% humidity."
    return Call("get_weather", args, result, summary, {"deg": deg, "temp": temp, "cond": condition, "hum": humidity})


def units_call(value: float | int, src: str, dst: str) -> Call:
    res = convert(value, src, dst)
    args = {"value": value, "from_unit": src, "to_unit": dst}
    result = {"value": value, "from_unit": src, "to_unit": dst, "result": num(res)}
    approx = "about " if is_rounded(res) else ""
    summary = f"{fmt(value)} {unit_word(src, value)} is {approx}{fmt(res)} {unit_word(dst, res)}."
    return Call("convert_units", args, result, summary)


def calc_call(expression: str) -> Call:
    value = safe_eval(expression)
    result = {"expression": expression, "result": num(value, 6)}
    approx = "≈" if is_rounded(value, 6) else "="
    return Call("calculator", {"expression": expression}, result, f"{expression} {approx} {fmt(value, 6)}.")


def currency_call(amount: float | int, src: str, dst: str) -> Call:
    rate = Decimal(RATES_PER_USD[dst]) / Decimal(RATES_PER_USD[src])
    converted = (Decimal(str(amount)) * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    rate_shown = rate.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP).normalize()
    args = {"amount": amount, "from_currency": src, "to_currency": dst}
    result = {"amount": amount, "from_currency": src, "to_currency": dst, "rate": float(rate_shown),
              "converted": float(converted), "note": "illustrative fixed rate"}  # fmt: skip
    summary = (
        f"{fmt(amount)} {src} is about {converted} {dst} "
        f"(illustrative fixed rate: 1 {src} = {fmt(rate_shown, 6)} {dst})."
    )
    return Call("currency_convert", args, result, summary)


def hhmm(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def offset_text(offset: int) -> str:
    sign = "+" if offset >= 0 else "-"
    return f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


def time_call(city: str, tz: str, offset: int, utc_minutes: int, given: bool) -> Call:
    """given=True: the user gave a UTC time to convert; otherwise utc_minutes is the synthetic 'now'."""
    local = utc_minutes + offset
    day = "previous day" if local < 0 else "next day" if local >= 24 * 60 else "same day"
    args = {"timezone": tz}
    if given:
        args["utc_time"] = hhmm(utc_minutes)
    result = {"timezone": tz, "utc_time": hhmm(utc_minutes), "local_time": hhmm(local)}
    result["utc_offset"] = offset_text(offset)
    if day != "same day":
        result["day"] = day
    day_note = f" on the {day}" if day != "same day" else ""
    if given:
        summary = (
            f"When it's {hhmm(utc_minutes)} UTC, it's {hhmm(local)}{day_note} in {city} (UTC{offset_text(offset)})."
        )
    else:
        summary = f"It's currently {hhmm(local)} in {city} (UTC{offset_text(offset)})."
    return Call("get_time_in_timezone", args, result, summary)


# Phrasings: the `train` lists are used for tool_calls.jsonl and preferences; the `eval` lists only for held-out rows.
WEATHER_PHRASES = {
    "train": [
        "What's the weather in {city}?",
        "How's the weather in {city} today?",
        "Weather for {city}, please.",
        "Can you check the weather in {city}?",
        "Tell me the current weather in {city}.",
        "I'm heading to {city}. What's the weather like there?",
    ],
    "eval": ["Could you look up how the weather is in {city}?", "Is it nice out in {city} at the moment?"],
}
WEATHER_UNIT_PHRASES = {
    "train": ["What's the weather in {city} in {Unit}?", "Weather in {city}, in {unit} please.",
              "How warm is it in {city}? Give me {Unit}."],
    "eval": ["Give me the weather for {city} in {Unit}."],
}  # fmt: skip
WEATHER_DATE_PHRASES = {
    "train": ["What's the forecast for {city} on {date}?", "Weather in {city} on {date}?",
              "What will the weather be like in {city} on {date}?"],
    "eval": ["I'm visiting {city} on {date}. What weather should I expect?"],
}  # fmt: skip
UNITS_PHRASES = {
    "train": ["Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "What is {v} {s} in {d}?", "{v} {s} in {d}?"],
    "eval": ["I need {v} {s} expressed in {d}.", "Change {v} {s} into {d}, please."],
}
CALC_PHRASES = {
    "train": ["What is {e}?", "Calculate {e}.", "Use the calculator to evaluate {e}.", "Compute {e} for me.",
              "{e} = ?"],
    "eval": ["Could you work out {e}?", "I need the value of {e}."],
}  # fmt: skip
CURRENCY_PHRASES = {
    "train": ["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "What's {a} {sn} in {dn}?",
              "{a} {s} to {d}, please."],
    "eval": ["I have {a} {s}. How many {dn} is that?", "Exchange {a} {sn} into {d}: how much do I get?"],
}  # fmt: skip
TIME_NOW_PHRASES = {
    "train": ["What time is it in {city}?", "Current time in {city}?", "What's the time in {city} right now?"],
    "eval": ["What's the local time in {city} right now?"],
}
TIME_UTC_PHRASES = {
    "train": ["When it's {t} UTC, what time is it in {city}?", "Convert {t} UTC to {city} time.",
              "It's {t} UTC. What time is it in {city}?"],
    "eval": ["If it's {t} UTC, what's the time in {city}?"],
}  # fmt: skip

TOOL_SYSTEM_PROMPTS = [
    "You are a helpful assistant with access to tools.",
    "You are a travel assistant. Use the tools when they help.",
    "You are a helpful assistant. Call a tool when you need live data or exact arithmetic.",
    "You are a concise assistant. Use tools for weather, conversions, currency, time and calculations.",
]


@dataclass
class Req:
    """One user request: the prompt and the calls it should trigger (empty = answer directly)."""

    text: str
    calls: list[Call]
    direct: str = ""  # the direct answer when calls is empty


class ToolGen:
    """Builds tool-calling requests from either the train or the held-out eval pools."""

    def __init__(self, rng: random.Random, split: str):
        self.rng = rng
        self.split = split
        self.cities = WEATHER_CITIES_TRAIN if split == "train" else WEATHER_CITIES_EVAL
        self.tz_cities = TZ_CITIES_TRAIN if split == "train" else TZ_CITIES_EVAL

    def phrase(self, table: dict) -> str:
        return self.rng.choice(table[self.split])

    def city(self, exclude: tuple[str, ...] = ()) -> str:
        return self.rng.choice([c for c in self.cities if c not in exclude])

    def weather(self, city: str | None = None, mode: str | None = None) -> Req:
        rng = self.rng
        city = city or self.city()
        mode = mode or rng.choices(["plain", "unit", "date"], weights=[5, 2, 2])[0]
        if mode == "unit":
            unit = rng.choice(["celsius", "fahrenheit", "fahrenheit"])
            text = self.phrase(WEATHER_UNIT_PHRASES).format(city=city, unit=unit, Unit=unit.capitalize())
            return Req(text, [weather_call(city, self.cities[city], unit=unit)])
        if mode == "date":
            d = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randint(0, 700))
            shown = d.isoformat() if rng.random() < 0.5 else date_words(d)
            text = self.phrase(WEATHER_DATE_PHRASES).format(city=city, date=shown)
            return Req(text, [weather_call(city, self.cities[city], date=d.isoformat())])
        return Req(self.phrase(WEATHER_PHRASES).format(city=city), [weather_call(city, self.cities[city])])

    def units(self) -> Req:
        value, src, dst = random_unit_question(self.rng)
        if self.split == "eval":
            value = value + 1 if isinstance(value, int) and value % 5 == 0 else value  # other values than train
        text = self.phrase(UNITS_PHRASES).format(v=fmt(value), s=unit_word(src, value), d=unit_word(dst, 2))
        return Req(text, [units_call(value, src, dst)])

    def expression(self) -> str:
        rng = self.rng
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 30)
        k = rng.randrange(9)
        if k == 0:
            return f"{a} + {b} * {c}"
        if k == 1:
            return f"({a} + {b}) * {c}"
        if k == 2:
            return f"{a * 13} * {b} - {c}"
        if k == 3:
            return f"{a * c} / {c}" if rng.random() < 0.5 else f"{a} / {c}"
        if k == 4:
            return f"{c} ** 2 - {b}"
        if k == 5:
            return f"{a * 37} % {c}"
        if k == 6:
            return f"({a * 10} - {b}) / {rng.choice([2, 4, 5, 8])}"
        if k == 7:
            return f"{a}.5 * {rng.choice([2, 4, 6, 10])}"
        return f"{a} * ({b} + {c}) / {rng.choice([3, 4, 5, 6])}"

    def calc(self) -> Req:
        e = self.expression()
        return Req(self.phrase(CALC_PHRASES).format(e=e), [calc_call(e)])

    def currency_pair(self) -> tuple[str, str]:
        return tuple(self.rng.sample(list(RATES_PER_USD), 2))

    def amount(self) -> int | float:
        rng = self.rng
        if self.split == "eval":
            return rng.choice([35, 65, 95, 130, 275, 420, 860, 1250, 3300, 47.5, 12.25])
        return rng.choice([10, 20, 25, 50, 75, 100, 120, 150, 200, 250, 300, 500, 750, 1000, 2000, 5000, 19.99, 7.5])

    def currency(self) -> Req:
        src, dst = self.currency_pair()
        a = self.amount()
        text = self.phrase(CURRENCY_PHRASES).format(
            a=fmt(a), s=src, d=dst, sn=CURRENCY_NAMES[src], dn=CURRENCY_NAMES[dst]
        )
        return Req(text, [currency_call(a, src, dst)])

    def time(self, city: str | None = None, given: bool | None = None) -> Req:
        rng = self.rng
        city = city or rng.choice(list(self.tz_cities))
        tz, offset = self.tz_cities[city]
        given = rng.random() < 0.5 if given is None else given
        utc = rng.randrange(0, 24 * 60, 5) if given else rng.randrange(24 * 60)
        if given:
            text = self.phrase(TIME_UTC_PHRASES).format(t=hhmm(utc), city=city)
        else:
            text = self.phrase(TIME_NOW_PHRASES).format(city=city)
        return Req(text, [time_call(city, tz, offset, utc, given)])

    def single(self, name: str | None = None) -> Req:
        name = name or self.rng.choices(TOOL_NAMES, weights=[5, 4, 4, 4, 3])[0]
        return {
            "get_weather": self.weather,
            "convert_units": self.units,
            "calculator": self.calc,
            "currency_convert": self.currency,
            "get_time_in_timezone": self.time,
        }[name]()

    def parallel(self) -> Req:
        rng = self.rng
        k = rng.randrange(7)
        if k <= 1:
            n = rng.choice([2, 2, 3])
            cities = rng.sample(list(self.cities), n)
            unit = "fahrenheit" if rng.random() < 0.25 else None
            calls = [weather_call(c, self.cities[c], unit=unit) for c in cities]
            tail = f" in {unit.capitalize()}" if unit else ""
            text = rng.choice(
                ["What's the weather in {c}{u}?", "Compare the weather in {c}{u}.", "How's the weather in {c}{u}?"]
            ).format(c=join_words(cities), u=tail)
            return Req(text, calls)
        if k == 2:
            reqs = []
            while len(reqs) < 2:
                value, src, dst = random_unit_question(rng)
                if all(r[1] != src for r in reqs):
                    reqs.append((value, src, dst))
            calls = [units_call(*r) for r in reqs]
            parts = [f"{fmt(v)} {unit_word(s, v)} to {unit_word(d, 2)}" for v, s, d in reqs]
            return Req(f"Convert {parts[0]}, and {parts[1]}.", calls)
        if k == 3:
            a = self.amount()
            src = rng.choice(["USD", "EUR", "GBP"])
            targets = rng.sample([c for c in RATES_PER_USD if c != src], rng.choice([2, 3]))
            calls = [currency_call(a, src, t) for t in targets]
            return Req(f"How much is {fmt(a)} {src} in {join_words(targets)}?", calls)
        if k == 4:
            exprs = [self.expression(), self.expression()]
            while exprs[1] == exprs[0]:
                exprs[1] = self.expression()
            return Req(f"Calculate {exprs[0]} and {exprs[1]}.", [calc_call(e) for e in exprs])
        if k == 5:
            both = [c for c in self.cities if c in self.tz_cities]
            city = rng.choice(both)
            tz, offset = self.tz_cities[city]
            calls = [weather_call(city, self.cities[city]), time_call(city, tz, offset, rng.randrange(24 * 60), False)]
            text = rng.choice(["What's the weather in {c} and what time is it there?",
                               "Weather and local time in {c}, please."]).format(c=city)  # fmt: skip
            return Req(text, calls)
        a = self.amount()
        src, dst = self.currency_pair()
        e = self.expression()
        text = f"Convert {fmt(a)} {src} to {dst}, and also calculate {e}."
        return Req(text, [currency_call(a, src, dst), calc_call(e)])


def pick_tools(rng: random.Random, needed: list[str], max_extra: int = 2) -> list[str]:
    """The needed tools plus 0..max_extra distractors, shuffled (keeps most rows well under 700 tokens)."""
    others = [t for t in TOOL_NAMES if t not in needed]
    extra = rng.choice([k for k in (0, 1, 1, 2, 2, 3) if k <= max_extra])
    chosen = list(dict.fromkeys(needed)) + rng.sample(others, min(extra, len(others)))
    rng.shuffle(chosen)
    return chosen


def call_message(calls: list[Call], as_string: bool) -> dict:
    tool_calls = []
    for c in calls:
        args = dumps(c.args) if as_string else c.args
        tool_calls.append({"type": "function", "function": {"name": c.name, "arguments": args}})
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


def direct_request(gen: ToolGen, offered: list[str]) -> Req:
    """A request that needs no tool (or whose tool is not offered): answered directly."""
    rng = gen.rng
    k = rng.randrange(6)
    if k == 0:
        abilities = [TOOL_ABILITIES[t] for t in offered]
        return Req(rng.choice(["What can you do?", "Which tools do you have?", "How can you help me?"]),
                   [], f"I can {join_words(abilities)}. Just ask!")  # fmt: skip
    if k == 1:
        word = rng.choice(ASCII_WORDS + LETTER_WORDS)
        return Req(f"Spell '{word}' backwards.", [], f"'{word}' backwards is '{word[::-1]}'.")
    if k == 2:
        word = rng.choice(LETTER_WORDS)
        n = sum(ch in "aeiou" for ch in word)
        return Req(f"How many vowels are in '{word}'?", [], f"'{word}' has {n} vowels.")
    if k == 3:
        return Req(rng.choice(["Hi there!", "Hello!", "Good morning!"]), [], "Hello! How can I help you today?")
    if k == 4:
        words = rng.sample(ASCII_WORDS, 4)
        return Req(f"Which of these words is the longest: {', '.join(words)}?", [],
                   f"'{max(words, key=len)}' is the longest ({len(max(words, key=len))} letters).")  # fmt: skip
    missing = [t for t in ("get_weather", "currency_convert", "get_time_in_timezone") if t not in offered]
    if not missing:
        return direct_request(gen, offered)
    what = rng.choice(missing)
    city = gen.city()
    text = {
        "get_weather": f"What's the weather in {city}?",
        "currency_convert": f"Convert {fmt(gen.amount())} USD to EUR.",
        "get_time_in_timezone": f"What time is it in {rng.choice(list(gen.tz_cities))}?",
    }[what]
    noun = {"get_weather": "weather", "currency_convert": "currency", "get_time_in_timezone": "time-zone"}[what]
    abilities = [TOOL_ABILITIES[t] for t in offered]
    return Req(text, [], f"I don't have a {noun} tool available here, so I can't look that up. "
               f"I can {join_words(abilities)}.")  # fmt: skip
