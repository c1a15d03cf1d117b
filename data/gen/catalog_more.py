"""Training tools: math, files, databases, smart home, sports, music, recipes, reminders, translation, support."""

from __future__ import annotations

from .schema import A, B, I, N, O, S, Tool
from .tool_values import (
    CITIES,
    DATES,
    DBS,
    DIRS,
    INGREDIENTS,
    LANGS,
    LEAGUES,
    PATHS,
    PEOPLE,
    POSTCODES,
    QUERIES,
    ROOMS,
    SONGS,
    STREETS,
    TEAMS,
    TIMES,
    n,
)

MORE_TOOLS: list[Tool] = [
    Tool(
        "solve_quadratic",
        "Solve a*x^2 + b*x + c = 0.",
        {"a": N(), "b": N(), "c": N()},
        ["a", "b", "c"],
        [
            "Solve the quadratic a*x^2 + b*x + c = 0 with a={a}, b={b}, c={c}.",
            "Roots of the quadratic with a={a}, b={b}, c={c}?",
        ],
        lambda r: {"a": r.choice([1, 2, 3]), "b": r.choice([-7, -5, -3, 1, 4, 6]), "c": r.choice([-8, -4, 2, 3])},
        lambda a, d: {"discriminant": a["b"] ** 2 - 4 * a["a"] * a["c"]},
        lambda a, r: f"The discriminant is {r['discriminant']}.",
        near=[("What is the quadratic formula?", "x = (−b ± √(b² − 4ac)) / (2a).")],
        ability="solve quadratic equations",
    ),
    Tool(
        "compute_statistics",
        "Summary statistics of a list of numbers.",
        {"numbers": A(N()), "measures": A(S(enum=["mean", "median", "min", "max", "stdev"]))},
        ["numbers", "measures"],
        ["Give me the {measures} of {numbers}.", "What are the {measures} of these numbers: {numbers}?"],
        lambda r: {
            "numbers": r.sample([2, 3, 5, 7, 8, 11, 13, 16, 21, 34], r.randint(4, 6)),
            "measures": r.sample(["mean", "median", "min", "max"], 2),
        },
        lambda a, d: {
            m: {
                "mean": round(sum(a["numbers"]) / len(a["numbers"]), 3),
                "median": sorted(a["numbers"])[len(a["numbers"]) // 2],
                "min": min(a["numbers"]),
                "max": max(a["numbers"]),
            }[m]
            for m in a["measures"]
        },
        lambda a, r: "Results: " + ", ".join(f"{k} {v}" for k, v in r.items()) + ".",
        ability="compute statistics of numbers",
    ),
    Tool(
        "read_file",
        "Read a text file.",
        {"path": S(), "max_lines": I()},
        ["path"],
        ["Show me {path}.", "Read the first {max_lines} lines of {path}."],
        lambda r: {"path": r.choice(PATHS), "max_lines": r.choice([5, 10, 20, 50])},
        lambda a, d: {"lines": n(d, 0, 3, 120), "preview": "synthetic file contents"},
        lambda a, r: f"{a['path']} has {r['lines']} lines; here is the start of it.",
        vague=[
            ("Open that file and show me the first {max_lines} lines.", "Which file path should I read?", "{path}")
        ],
        ability="read files",
    ),
    Tool(
        "list_directory",
        "List a directory.",
        {"path": S(), "include_hidden": B()},
        ["path"],
        ["What's in {path}?", "List {path} including hidden files.|include_hidden"],
        lambda r: {"path": r.choice(DIRS), "include_hidden": True},
        lambda a, d: {"entries": n(d, 0, 2, 40)},
        lambda a, r: f"{a['path']} has {r['entries']} entries.",
        near=[
            (
                "What does 'ls -la' do?",
                "It lists all files in the directory, including hidden ones, in long "
                "format (permissions, owner, size, date).",
            )
        ],
        ability="list directories",
    ),
    Tool(
        "run_sql_query",
        "Run a read-only SQL query on a database.",
        {"database": S(enum=DBS), "query": S()},
        ["database", "query"],
        ["Run `{query}` on the {database} database.", "On {database}, execute: {query}"],
        lambda r: {"database": r.choice(DBS), "query": r.choice(QUERIES)},
        lambda a, d: {"rows": n(d, 0, 1, 50)},
        lambda a, r: f"The query returned {r['rows']} rows.",
        vague=[("Run `{query}` for me.", "Which database should I run it on?", "The {database} one.")],
        near=[
            (
                "What's the difference between WHERE and HAVING in SQL?",
                "WHERE filters rows before grouping; HAVING filters groups after GROUP BY.",
            )
        ],
        ability="run read-only SQL queries",
    ),
    Tool(
        "set_thermostat",
        "Set a room's thermostat.",
        {"room": S(), "temperature": N("°C"), "mode": S(enum=["heat", "cool", "auto"])},
        ["room", "temperature"],
        ["Set the {room} to {temperature} degrees.", "Set the {room} thermostat to {temperature} °C on {mode}."],
        lambda r: {
            "room": r.choice(ROOMS),
            "temperature": r.choice([18, 19, 20, 21, 22, 23, 21.5]),
            "mode": r.choice(["heat", "cool", "auto"]),
        },
        lambda a, d: {"status": "ok"},
        lambda a, r: f"The {a['room']} is set to {a['temperature']} °C.",
        vague=[("Set the thermostat to {temperature} degrees.", "Which room should I set?", "The {room}.")],
        ability="control the thermostat",
    ),
    Tool(
        "control_lights",
        "Turn lights on or off.",
        {"room": S(), "state": S(enum=["on", "off"]), "brightness": I("0-100")},
        ["room", "state"],
        ["Turn the {room} lights {state}.", "Turn {state} the lights in the {room} at {brightness}% brightness."],
        lambda r: {"room": r.choice(ROOMS), "state": r.choice(["on", "off"]), "brightness": r.choice([20, 50, 80])},
        lambda a, d: {"status": "ok"},
        lambda a, r: f"The {a['room']} lights are {a['state']}.",
        vague=[("Turn the lights {state}.", "Which room?", "The {room}.")],
        near=[
            (
                "Are LED bulbs cheaper to run than incandescent ones?",
                "Yes. LED bulbs use roughly 75-80% less energy for the same light.",
            )
        ],
        ability="switch lights",
    ),
    Tool(
        "get_match_score",
        "Latest score of a team (synthetic demo scores).",
        {"team": S(), "sport": S(enum=["football", "basketball", "hockey"])},
        ["team"],
        ["How did the {team} do?", "Latest {sport} score for the {team}?"],
        lambda r: {"team": r.choice(TEAMS), "sport": r.choice(["football", "basketball", "hockey"])},
        lambda a, d: {"score": f"{d[0] % 5}-{d[1] % 5}"},
        lambda a, r: f"The {a['team']}' last game ended {r['score']} (synthetic).",
        vague=[("What was the score last night?", "Which team do you mean?", "The {team}.")],
        near=[("How many players are on a football team on the field?", "Eleven per side in association football.")],
        ability="get (synthetic) match scores",
    ),
    Tool(
        "get_league_standings",
        "League table (synthetic).",
        {"league": S(), "season": S("e.g. 2025-26")},
        ["league"],
        ["Show the {league} standings.", "{league} table for the {season} season?"],
        lambda r: {"league": r.choice(LEAGUES), "season": r.choice(["2024-25", "2025-26"])},
        lambda a, d: {"leader": TEAMS[d[0] % len(TEAMS)]},
        lambda a, r: f"The {r['leader']} lead the {a['league']} (synthetic).",
        ability="show league tables",
    ),
]

MORE_TOOLS += [
    Tool(
        "play_music",
        "Play a song, artist or playlist.",
        {"query": S(), "shuffle": B(), "volume": I("0-100")},
        ["query"],
        ["Play {query}.", "Play {query} at volume {volume}.", "Shuffle {query}.|shuffle"],
        lambda r: {"query": r.choice(SONGS), "shuffle": True, "volume": r.choice([30, 45, 60, 75])},
        lambda a, d: {"status": "playing"},
        lambda a, r: f"Now playing {a['query']}.",
        vague=[("Play something at volume {volume}.", "What would you like to hear?", "{query}")],
        near=[("Who composed the Four Seasons?", "Antonio Vivaldi composed The Four Seasons.")],
        ability="play music",
    ),
    Tool(
        "create_playlist",
        "Create a playlist from songs.",
        {"name": S(), "songs": A(S())},
        ["name", "songs"],
        ["Make a playlist called '{name}' with {songs}.", "Create the playlist '{name}': {songs}."],
        lambda r: {"name": r.choice(["Focus", "Road trip", "Sunday", "Workout"]), "songs": r.sample(SONGS, 3)},
        lambda a, d: {"playlist_id": f"pl_{d[0]:02x}{d[1]:02x}", "tracks": len(a["songs"])},
        lambda a, r: f"Created '{a['name']}' with {r['tracks']} songs.",
        vague=[("Make a playlist with {songs}.", "What should the playlist be called?", "'{name}'")],
        ability="create playlists",
    ),
    Tool(
        "search_recipes",
        "Find recipes by ingredients.",
        {"ingredients": A(S()), "max_minutes": I(), "diet": S(enum=["vegetarian", "vegan", "gluten_free"])},
        ["ingredients"],
        [
            "What can I cook with {ingredients}?",
            "Find a {diet} recipe with {ingredients}.",
            "A recipe using {ingredients} that takes under {max_minutes} minutes?",
        ],
        lambda r: {
            "ingredients": r.sample(INGREDIENTS, 2),
            "max_minutes": r.choice([15, 20, 30, 45]),
            "diet": r.choice(["vegetarian", "vegan", "gluten_free"]),
        },
        lambda a, d: {"recipes": n(d, 0, 1, 12)},
        lambda a, r: f"I found {r['recipes']} recipes with {' and '.join(a['ingredients'])}.",
        near=[
            (
                "How long should I boil an egg for a soft yolk?",
                "About 6 to 7 minutes in boiling water gives a soft, jammy yolk.",
            )
        ],
        ability="find recipes",
    ),
    Tool(
        "scale_recipe",
        "Scale a saved recipe to a number of servings.",
        {"recipe_name": S(), "servings": I()},
        ["recipe_name", "servings"],
        ["Scale my {recipe_name} recipe to {servings} servings.", "I need the {recipe_name} for {servings} people."],
        lambda r: {
            "recipe_name": r.choice(["lasagne", "pancakes", "lentil soup", "banana bread"]),
            "servings": r.randint(2, 12),
        },
        lambda a, d: {"status": "scaled", "factor": round(a["servings"] / 4, 2)},
        lambda a, r: f"Your {a['recipe_name']} is scaled to {a['servings']} servings (x{r['factor']}).",
        vague=[("Scale my {recipe_name} recipe.", "How many servings do you need?", "{servings}")],
        ability="scale saved recipes",
    ),
    Tool(
        "set_reminder",
        "Set a reminder.",
        {"text": S(), "time": S("HH:MM"), "date": S("YYYY-MM-DD")},
        ["text", "time"],
        ["Remind me to {text} at {time}.", "Set a reminder to {text} on {date} at {time}."],
        lambda r: {
            "text": r.choice(["call the bank", "water the plants", "take my medicine", "book tickets"]),
            "time": r.choice(TIMES),
            "date": r.choice(DATES),
        },
        lambda a, d: {"reminder_id": f"rem_{d[0]:02x}", "status": "set"},
        lambda a, r: f"I'll remind you to {a['text']} at {a['time']}.",
        vague=[("Remind me to {text}.", "What time should I remind you?", "At {time}.")],
        ability="set reminders",
    ),
    Tool(
        "translate_text",
        "Translate text.",
        {"text": S(), "target_language": S(enum=LANGS)},
        ["text", "target_language"],
        ["Translate '{text}' into {target_language}.", "How do you say '{text}' in {target_language}?"],
        lambda r: {
            "text": r.choice(
                ["Where is the station?", "Thank you very much", "Good morning", "How much does it cost?"]
            ),
            "target_language": r.choice(LANGS),
        },
        lambda a, d: {"translation": "(synthetic translation)"},
        lambda a, r: f"Here is '{a['text']}' in {a['target_language']}.",
        vague=[("Translate '{text}' for me.", "Which language should I translate it into?", "{target_language}")],
        near=[
            (
                "Which languages are spoken in Switzerland?",
                "German, French, Italian and Romansh are its national languages.",
            )
        ],
        ability="translate text",
    ),
    Tool(
        "create_support_ticket",
        "Open a customer support ticket.",
        {
            "subject": S(),
            "priority": S(enum=["low", "medium", "high"]),
            "customer": O({"name": S(), "email": S()}, ["name", "email"]),
        },
        ["subject", "priority", "customer"],
        [
            "Open a {priority} priority ticket '{subject}' for {customer}.",
            "New support ticket: '{subject}', priority {priority}, customer {customer}.",
        ],
        lambda r: (
            lambda p: {
                "subject": r.choice(["Login fails", "Refund request", "Broken charger"]),
                "priority": r.choice(["low", "medium", "high"]),
                "customer": ({"name": p, "email": f"{p.lower()}@example.com"}, f"{p} ({p.lower()}@example.com)"),
            }
        )(r.choice(PEOPLE)),
        lambda a, d: {"ticket_id": f"T-{n(d, 0, 100, 999)}", "status": "open"},
        lambda a, r: f"Ticket {r['ticket_id']} '{a['subject']}' is open.",
        vague=[
            (
                "Open a ticket '{subject}' for {customer}.",
                "What priority should it have: low, medium or high?",
                "{priority}",
            )
        ],
        ability="open support tickets",
    ),
    Tool(
        "schedule_delivery",
        "Schedule a parcel delivery.",
        {
            "address": O({"street": S(), "city": S(), "postcode": S()}, ["street", "city", "postcode"]),
            "date": S("YYYY-MM-DD"),
            "window": S(enum=["morning", "afternoon", "evening"]),
        },
        ["address", "date"],
        ["Deliver my parcel to {address} on {date}.", "Schedule delivery to {address} on {date}, in the {window}."],
        lambda r: (
            lambda i: {
                "address": (
                    {"street": STREETS[i], "city": CITIES[i], "postcode": POSTCODES[i]},
                    f"{STREETS[i]}, {CITIES[i]} {POSTCODES[i]}",
                ),
                "date": r.choice(DATES),
                "window": r.choice(["morning", "afternoon", "evening"]),
            }
        )(r.randrange(5)),
        lambda a, d: {"status": "scheduled", "slot_id": f"S{d[0]:03d}"},
        lambda a, r: f"Delivery scheduled for {a['date']} (slot {r['slot_id']}).",
        vague=[("Schedule a delivery to {address}.", "Which date should it arrive?", "{date}")],
        ability="schedule deliveries",
    ),
]
