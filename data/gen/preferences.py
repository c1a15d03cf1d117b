"""preferences*.jsonl: a correct answer (chosen) and a plausible wrong one (rejected), text and tool rows."""

from __future__ import annotations

import random
from decimal import Decimal

from .common import SYSTEM_PROMPTS, TEMPERATURE, Task, assistant, fmt, money, system, unit_word, user, wrong_conversion
from .instructions import MULTI_TASKS, SINGLE_TASKS, task_messages, weighted_schedule
from .pref_tools import (
    TOOL_SYSTEM_PROMPTS,
    TOOLS,
    Call,
    ToolGen,
    calc_call,
    call_message,
    currency_call,
    direct_request,
    hhmm,
    pick_tools,
    time_call,
    units_call,
    weather_call,
)

# Preferences

REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I'm not able to do that kind of calculation reliably, so I'd rather not answer.",
    "As an AI language model, I can't be certain about this, so I won't guess.",
    "Sorry, that's outside what I can help with.",
]


def rambling(topic: str, rng: random.Random) -> str:
    openers = ["Great question!", "That's an interesting one.", "Good thinking to ask about this."]
    middles = [
        f"There are many ways to approach {topic}, and different people prefer different methods.",
        f"{topic.capitalize()} can be tricky, and it's easy to make small mistakes along the way.",
        f"When it comes to {topic}, the details really matter.",
    ]
    closers = [
        "It's always a good idea to double-check with a reliable source.",
        "In the end, it depends on what you need it for.",
        "Hopefully that gives you a sense of how to think about it!",
    ]
    return " ".join([rng.choice(openers), rng.choice(middles), rng.choice(closers)])


def pref_text_row(rng: random.Random, task: Task, plain: bool = False) -> dict:
    r = rng.random()
    chosen_text = task.turns[-1][1]
    if r < 0.68:
        rejected_text = task.wrong
    elif r < 0.84:
        rejected_text = rng.choice(REFUSALS)
    else:
        rejected_text = rambling(task.topic, rng)
    if plain:
        return {"prompt": task.turns[-1][0], "chosen": chosen_text, "rejected": rejected_text}
    sys_prompt = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.25 else None
    return {
        "prompt": task_messages(task, sys_prompt, upto_last_user=True),
        "chosen": [assistant(chosen_text)],
        "rejected": [assistant(rejected_text)],
    }


def wrong_call(gen: ToolGen, call: Call) -> tuple[Call, str]:
    """A plausible wrong tool call for the same request, and the name of the tool it uses."""
    rng = gen.rng
    a = call.args
    if call.name == "get_weather":
        if rng.random() < 0.5:
            other = gen.city(exclude=(a["city"],))
            return weather_call(other, gen.cities[other], a.get("date"), a.get("unit")), "get_weather"
        unit = {"fahrenheit": "celsius", "celsius": "fahrenheit"}.get(a.get("unit", ""), "fahrenheit")
        return weather_call(a["city"], gen.cities[a["city"]], a.get("date"), unit), "get_weather"
    if call.name == "convert_units":
        if rng.random() < 0.5 or a["from_unit"] in TEMPERATURE:
            return units_call(a["value"], a["to_unit"], a["from_unit"]), "convert_units"
        src, dst = a["from_unit"], a["to_unit"]
        return calc_call(f"{fmt(a['value'])} * {fmt(wrong_conversion(1, src, dst) or 2, 6)}"), "calculator"
    if call.name == "calculator":
        e = a["expression"]
        swaps = ((" ** ", " * "), (" * ", " + "), (" + ", " - "), (" - ", " + "), (" % ", " / "), (" / ", " * "))
        for op, other in swaps:
            if op in e:
                return calc_call(e.replace(op, other, 1)), "calculator"
        return calc_call(f"{e} + 1"), "calculator"
    if call.name == "currency_convert":
        if rng.random() < 0.5:
            return currency_call(a["amount"], a["to_currency"], a["from_currency"]), "currency_convert"
        return calc_call(f"{fmt(a['amount'])} * 1.1"), "calculator"
    city = next(c for c, (tz, _) in gen.tz_cities.items() if tz == a["timezone"])
    if city in gen.cities and rng.random() < 0.5:
        return weather_call(city, gen.cities[city]), "get_weather"
    other = rng.choice([c for c in gen.tz_cities if gen.tz_cities[c][0] != a["timezone"]])
    return time_call(other, *gen.tz_cities[other], 720, "utc_time" in a), "get_time_in_timezone"


def hallucinated(gen: ToolGen, call: Call) -> str:
    """A confident answer given without calling the tool, with a made-up (wrong) value."""
    rng = gen.rng
    a = call.args
    if call.name == "get_weather":
        deg = "°F" if a.get("unit") == "fahrenheit" else "°C"
        temp = call.result["temperature"] + rng.choice([-7, -4, 3, 6])
        return f"It's {temp} {deg} and sunny in {a['city']}."
    if call.name == "convert_units":
        bad = wrong_conversion(a["value"], a["from_unit"], a["to_unit"])
        src = unit_word(a["from_unit"], a["value"])
        return f"{fmt(a['value'])} {src} is about {fmt(bad)} {unit_word(a['to_unit'], 2)}."
    if call.name == "calculator":
        return f"{a['expression']} = {fmt(call.result['result'] + rng.choice([-2, -1, 1, 10]), 6)}."
    if call.name == "currency_convert":
        guess = money(Decimal(str(a["amount"])) * Decimal("1.1"))
        return f"{fmt(a['amount'])} {a['from_currency']} is about {guess} {a['to_currency']}."
    return f"It's {hhmm(rng.randrange(24 * 60))} there right now."


def pref_tool_row(gen: ToolGen) -> tuple[dict, str]:
    rng = gen.rng
    r = rng.random()
    req = gen.parallel() if r < 0.2 else gen.single()
    needed = [c.name for c in req.calls]
    chosen = [call_message(req.calls, as_string=False)]
    if r < 0.2:  # parallel: the rejected answer forgets one of the calls
        rejected = [call_message(req.calls[:-1], as_string=False)]
    elif r < 0.75:
        bad, bad_tool = wrong_call(gen, req.calls[0])
        needed.append(bad_tool)
        rejected = [call_message([bad], as_string=False)]
    elif r < 0.9:  # answers without calling, with a made-up (and wrong) value
        rejected = [assistant(hallucinated(gen, req.calls[0]))]
    else:
        rejected = [assistant(rng.choice(REFUSALS))]
    offered = pick_tools(rng, needed, max_extra=2)
    prompt = [system(rng.choice(TOOL_SYSTEM_PROMPTS))] if rng.random() < 0.3 else []
    prompt.append(user(req.text))
    return {"tools": [TOOLS[t] for t in offered], "prompt": prompt, "chosen": chosen, "rejected": rejected}, req.text


def pref_direct_tool_row(gen: ToolGen) -> tuple[dict, str]:
    """No tool is needed: the direct answer is chosen over an unnecessary tool call."""
    rng = gen.rng
    offered = pick_tools(rng, ["calculator", "get_weather"], max_extra=1)
    req = direct_request(gen, offered)
    while req.text.startswith("What's the weather") or req.text.startswith(("Convert", "What time")):
        req = direct_request(gen, offered)
    bad = calc_call(f"{rng.randint(2, 99)} + {rng.randint(2, 99)}") if rng.random() < 0.5 else gen.weather()
    bad_call = bad if isinstance(bad, Call) else bad.calls[0]
    row = {
        "tools": [TOOLS[t] for t in offered],
        "prompt": [user(req.text)],
        "chosen": [assistant(req.direct)],
        "rejected": [call_message([bad_call], as_string=False)],
    }
    return row, req.text


def make_preferences(rng: random.Random, split: str, n: int, forbidden: set[str]) -> list[dict]:
    gen = ToolGen(rng, split)
    table = SINGLE_TASKS + MULTI_TASKS
    n_tool = n * 18 // 100
    n_direct = n * 4 // 100
    n_plain = 8 if split == "train" else 2
    kinds = ["tool"] * n_tool + ["direct"] * n_direct + ["plain"] * n_plain
    kinds += ["text"] * (n - len(kinds))
    rng.shuffle(kinds)
    schedule = iter(weighted_schedule(rng, table, n))
    rows, seen = [], set(forbidden)
    for kind in kinds:
        fn = next(schedule)
        if kind == "plain":
            fn = rng.choice([f for f, _ in SINGLE_TASKS])
        while True:
            if kind == "tool":
                row, key = pref_tool_row(gen)
            elif kind == "direct":
                row, key = pref_direct_tool_row(gen)
            else:
                task = fn(rng)
                row = pref_text_row(rng, task, plain=kind == "plain")
                key = task.turns[-1][0] if kind == "plain" else "\n".join(u for u, _ in task.turns)
            if key not in seen and row["chosen"] != row["rejected"]:
                seen.add(key)
                break
        rows.append(row)
    return rows
