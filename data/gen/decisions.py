"""One-request rows tagged with the decision they test (`"decision"`, a key the loaders and the scorer ignore and
`qwentune eval` breaks its table down by): "call" (single and parallel calls), "answer" (no call: a related question
the offered tool cannot answer, general knowledge, small talk), "not_offered" (the request needs a tool that is not
offered; its near miss is: cancel vs reserve, surf vs tides) and "missing_argument" (a required argument is missing:
the assistant asks for it). Three files:

  tool_calls_decisions_eval.jsonl   held out: the tools of `decision_catalog` only, none of them in any training file
  tool_calls_decisions.jsonl        training tools, for mining preference pairs from a tuned model's misses
                                    (`qwentune eval MODEL --data data/tool_calls_decisions.jsonl --pairs ...`)
  tool_calls_decisions_pairs.jsonl  DPO pairs of the same rows with a scripted wrong reply (`rejected`), written
                                    the way the Quickstart fails: the near-miss tool called where no offered tool
                                    fits, the missing argument made up, a call where a question needs none, no call
                                    where one is due; a start for the decision stage before any pairs are mined.
                                    After those 96, 72 pairs whose `chosen` is the call (`call_pairs`): a question
                                    asked though every argument was given, or a refusal though the tool is offered.
                                    Without them 3 of 4 pairs reject a call, and DPO teaches "never call" (measured:
                                    0/13 calls on the held-out split after 16 steps, issue 27)
"""

from __future__ import annotations

import random

from .decision_catalog import DECISION_TOOLS, SIBLINGS, TRAIN_SIBLINGS
from .direct_answers import KNOWLEDGE_EVAL, KNOWLEDGE_TRAIN, SMALL_TALK_EVAL
from .schema import Tool, make_call
from .tool_catalog import TRAIN_TOOLS
from .tools import MAX_OFFERED, SYSTEM_PROMPTS, asked, call_turn, called, fill, parallel, said, user_key

DECISIONS = ("call", "answer", "not_offered", "missing_argument")
# Rows per kind: calls (single, parallel), then one kind per decision.
EVAL_COUNTS = {"single": 24, "parallel": 12, "answer": 24, "not_offered": 24, "missing_argument": 24}
MINE_COUNTS = {"single": 16, "parallel": 8, "answer": 24, "not_offered": 24, "missing_argument": 24}
CALL_PAIR_COUNTS = {"single": 48, "parallel": 24}  # with the 24 above: 96 pairs choose a call, 72 choose no call
UNCALLED = ["I don't have access to that information right now.", "Sorry, I can't look that up.",
            "I'm not able to do that."]  # fmt: skip


def _offer(rng: random.Random, pool: list[Tool], needed: list[Tool], banned: Tool | None = None) -> list[Tool]:
    extra = [t for t in pool if t not in needed and t is not banned]
    chosen = list(dict.fromkeys(needed))
    chosen += rng.sample(extra, min(MAX_OFFERED - len(chosen), rng.choice([1, 1, 2, 2, 3])))
    rng.shuffle(chosen)
    return chosen


def decision_row(rng: random.Random, kind: str, pool: list[Tool], siblings: dict[str, list[str]], tool: Tool | None,
                 answers: list[tuple[str, str]]) -> tuple[dict, dict]:  # fmt: skip
    """One request of `kind` about `tool` (None: any; for "answer", a general question) and the assistant's turn;
    and a scripted wrong reply to it (the pairs' `rejected`)."""
    by_name = {t.name: t for t in pool}

    def wrong_call(near: Tool) -> dict:  # the near tool called as if it fitted
        return call_turn([make_call(near, rng.choice(near.prompts), rng)[2]], as_string=False)

    if kind == "single":
        prompt, _, call = fill(tool or rng.choice(pool), rng)
        msgs, offered = called(prompt, [call], as_string=False), _offer(rng, pool, [by_name[call.name]])
        wrong = {"role": "assistant", "content": rng.choice(UNCALLED)}
    elif kind == "parallel":
        prompt, calls = parallel(rng, pool)
        msgs = called(prompt, calls, as_string=False)
        offered = _offer(rng, pool, [by_name[c.name] for c in calls])
        wrong = call_turn(calls[:1], as_string=False)  # one call short
    elif kind == "answer":
        msgs = said(*rng.choice(tool.near if tool else answers))
        offered = _offer(rng, pool, [tool or rng.choice(pool)])
        wrong = wrong_call(tool or rng.choice(offered))
    elif kind == "not_offered":  # the request's own tool is missing; its near miss is offered
        wanted = tool or rng.choice([t for t in pool if t.name in siblings])
        near = by_name[rng.choice(siblings[wanted.name])]
        offered = _offer(rng, pool, [near], banned=wanted)
        names = ", ".join(t.name for t in offered)
        msgs = said(fill(wanted, rng)[0], f"I can't do that: none of the tools I have here can ({names}). Is there "
                    "something else I can help with?")  # fmt: skip
        wrong = wrong_call(near)
    else:  # missing_argument: the call made anyway, the missing argument made up
        msgs, (_, call), asked_tool = asked(rng, pool, tool)
        offered = _offer(rng, pool, [asked_tool])
        wrong = call_turn([call], as_string=False)
    if rng.random() < 0.35:
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *msgs]
    row = {"tools": [t.schema for t in offered], "messages": msgs,
           "decision": "call" if kind in ("single", "parallel") else kind}  # fmt: skip
    return row, wrong


def _eligible(kind: str, pool: list[Tool], siblings: dict[str, list[str]]) -> list[Tool | None]:
    """The tools a kind's rows go through in order (each at least once while the count allows), then any."""
    if kind == "answer":
        return [t for t in pool if t.near]
    if kind == "not_offered":
        return [t for t in pool if t.name in siblings]
    if kind == "missing_argument":
        return [t for t in pool if t.vague]
    return list(pool) if kind == "single" else []


def decision_rows(rng: random.Random, counts: dict[str, int], pool: list[Tool], siblings: dict[str, list[str]],
                  answers: list[tuple[str, str]], forbidden: set[str]) -> list[tuple[dict, dict]]:  # fmt: skip
    """`counts` rows per kind, in a shuffled order, every user text new and none in `forbidden`, each with its
    scripted wrong reply."""
    plan = []
    for kind, count in counts.items():
        tools = _eligible(kind, pool, siblings)
        plan += [(kind, tools[i] if i < len(tools) else None) for i in range(count)]
    rng.shuffle(plan)
    rows, seen = [], set()
    for kind, tool in plan:
        for tries in range(300):
            row, wrong = decision_row(rng, kind, pool, siblings, tool if tries < 30 else None, answers)
            key = user_key(row)
            if key not in seen and not (set(key) & forbidden):
                break
        else:
            raise RuntimeError(f"could not make a new {kind} row")
        seen.add(key)
        rows.append((row, wrong))
    return rows


def held_out_decisions(rng: random.Random, forbidden: set[str]) -> list[dict]:
    made = decision_rows(rng, EVAL_COUNTS, DECISION_TOOLS, SIBLINGS, KNOWLEDGE_EVAL + SMALL_TALK_EVAL, forbidden)
    return [row for row, _ in made]


def mining_decisions(rng: random.Random, forbidden: set[str]) -> tuple[list[dict], list[dict]]:
    """The mining rows (training tools) and their DPO pairs with the scripted wrong reply as `rejected`."""
    made = decision_rows(rng, MINE_COUNTS, TRAIN_TOOLS, TRAIN_SIBLINGS, KNOWLEDGE_TRAIN, forbidden)
    pairs = [_pair(row, wrong, {"decision": row["decision"], "rejected": "scripted"}) for row, wrong in made]
    return [row for row, _ in made], pairs


def _first_turn(row: dict) -> int:
    return next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")


def _pair(row: dict, wrong: dict, meta: dict) -> dict:
    """A DPO pair: the row's prompt up to its first assistant turn, that turn chosen, `wrong` rejected."""
    turn = _first_turn(row)
    return {"prompt": row["messages"][:turn], "chosen": [row["messages"][turn]], "rejected": [wrong],
            "tools": row["tools"], "meta": meta}  # fmt: skip


def call_pairs(rng: random.Random, forbidden: set[str]) -> list[dict]:
    """Pairs whose `chosen` calls (training tools) and whose `rejected` does not: the way a model over-corrected by
    the other pairs fails, asking for an argument the user gave or refusing though the tool is offered."""
    made = decision_rows(rng, CALL_PAIR_COUNTS, TRAIN_TOOLS, TRAIN_SIBLINGS, KNOWLEDGE_TRAIN, forbidden)
    by_name = {t.name: t for t in TRAIN_TOOLS}
    pairs = []
    for n, (row, _) in enumerate(made):
        first = by_name[row["messages"][_first_turn(row)]["tool_calls"][0]["function"]["name"]]
        if n % 2 == 0 and first.vague:
            wrong, how = rng.choice(first.vague)[1], "asked_anyway"
        else:
            names = ", ".join(t["function"]["name"] for t in row["tools"])
            wrong, how = f"I can't do that: none of the tools I have here can ({names}).", "refused_anyway"
        pairs.append(_pair(row, {"role": "assistant", "content": wrong}, {"decision": "call", "rejected": how}))
    return pairs
