"""The held-out tool catalog: tools (names and schemas) that never occur in any training file, so the eval split
measures whether a tune learned to call tools in general rather than to recall the training tools. Synthetic values.
"""

from __future__ import annotations

from .schema import A, B, I, N, O, S, Tool
from .tool_values import n

HARBORS = ["Port Ellen", "Kinsale", "Honfleur", "St Ives", "Stavanger", "Monterey"]
EVAL_DATES = ["2027-02-11", "2027-04-23", "2027-06-08", "2027-08-29", "2027-10-02"]
RESTAURANTS = ["Casa Lumo", "The Copper Pot", "Sakura Garden", "Le Petit Four", "Nonna's Kitchen"]
PLAYERS = ["Mara Quinn", "Tobi Adeyemi", "Lena Vogt", "Sam Okafor"]  # made-up players
STATIONS = ["Northfield", "Kingsbridge", "Elm Park", "Riverside Central"]
GUESTS = ["Nadia", "Oscar", "Priya", "Quentin"]


def payment(principal: float, annual_rate: float, years: int) -> float:
    rate, months = annual_rate / 1200, years * 12
    return round(principal * rate / (1 - (1 + rate) ** -months), 2)


EVAL_TOOLS: list[Tool] = [
    Tool(
        "get_tide_times",
        "High and low tide times for a harbour (synthetic).",
        {"harbor": S(), "date": S("YYYY-MM-DD")},
        ["harbor"],
        ["When is high tide at {harbor}?", "Tide times for {harbor} on {date}?"],
        lambda r: {"harbor": r.choice(HARBORS), "date": r.choice(EVAL_DATES)},
        lambda a, d: {"high_tide": f"{n(d, 0, 0, 11):02d}:{n(d, 1, 0, 5)}0"},
        lambda a, r: f"High tide at {a['harbor']} is at {r['high_tide']} (synthetic).",
        vague=[("When's high tide on {date}?", "Which harbour do you mean?", "{harbor}")],
        near=[("What causes tides?", "Mainly the Moon's gravity, with a smaller pull from the Sun.")],
    ),
    Tool(
        "reserve_table",
        "Reserve a restaurant table.",
        {"restaurant": S(), "party_size": I(), "time": S("HH:MM"), "date": S("YYYY-MM-DD"), "outdoor": B()},
        ["restaurant", "party_size", "time"],
        [
            "Reserve a table for {party_size} at {restaurant} at {time}.",
            "Book {restaurant} for {party_size} people on {date} at {time}.",
            "Table for {party_size} at {restaurant} at {time}, outside please.|outdoor",
        ],
        lambda r: {
            "restaurant": r.choice(RESTAURANTS),
            "party_size": r.randint(2, 8),
            "time": r.choice(["12:30", "18:00", "19:15", "20:45"]),
            "date": r.choice(EVAL_DATES),
            "outdoor": True,
        },
        lambda a, d: {"status": "reserved", "reservation": f"R{d[0]:03d}"},
        lambda a, r: f"Reserved {a['restaurant']} for {a['party_size']} at {a['time']}.",
        vague=[("Reserve a table at {restaurant} at {time}.", "How many people will there be?", "{party_size}")],
        near=[("How much should I tip at a restaurant in the US?", "Around 15-20% of the bill is customary.")],
    ),
    Tool(
        "get_air_quality",
        "Air quality index for a city (synthetic).",
        {"city": S(), "pollutant": S(enum=["pm25", "pm10", "ozone", "no2"])},
        ["city"],
        ["How's the air quality in {city}?", "What's the {pollutant} level in {city}?"],
        lambda r: {
            "city": r.choice(["Quito", "Tallinn", "Porto", "Accra", "Busan"]),
            "pollutant": r.choice(["pm25", "pm10", "ozone", "no2"]),
        },
        lambda a, d: {"aqi": n(d, 0, 10, 160)},
        lambda a, r: f"The AQI in {a['city']} is {r['aqi']} (synthetic).",
    ),
    Tool(
        "rent_car",
        "Rent a car.",
        {
            "pickup_city": S(),
            "pickup_date": S("YYYY-MM-DD"),
            "days": I(),
            "car_class": S(enum=["compact", "suv", "van"]),
        },
        ["pickup_city", "pickup_date", "days"],
        [
            "Rent a car in {pickup_city} from {pickup_date} for {days} days.",
            "I need a {car_class} in {pickup_city} on {pickup_date} for {days} days.",
        ],
        lambda r: {
            "pickup_city": r.choice(["Quito", "Tallinn", "Porto", "Accra", "Busan"]),
            "pickup_date": r.choice(EVAL_DATES),
            "days": r.randint(2, 10),
            "car_class": r.choice(["compact", "suv", "van"]),
        },
        lambda a, d: {"status": "booked", "price_usd": n(d, 0, 30, 90) * a["days"]},
        lambda a, r: f"Car booked in {a['pickup_city']} for {a['days']} days ({r['price_usd']} USD, synthetic).",
        vague=[
            (
                "Rent me a car in {pickup_city} for {days} days.",
                "Which day do you want to pick it up?",
                "{pickup_date}",
            )
        ],
    ),
    Tool(
        "calculate_loan_payment",
        "Monthly payment of a fixed-rate loan.",
        {"principal": N(), "annual_rate": N("Percent"), "years": I()},
        ["principal", "annual_rate", "years"],
        [
            "Monthly payment on a {principal} loan at {annual_rate}% over {years} years?",
            "What would I pay per month for {principal} borrowed at {annual_rate}% for {years} years?",
        ],
        lambda r: {
            "principal": r.choice([12000, 25000, 180000, 300000]),
            "annual_rate": r.choice([3.5, 4.2, 5, 6.75]),
            "years": r.choice([5, 10, 15, 30]),
        },
        lambda a, d: {"monthly_payment": payment(a["principal"], a["annual_rate"], a["years"])},
        lambda a, r: f"About {r['monthly_payment']} per month.",
        near=[
            (
                "What is compound interest?",
                "Interest computed on the principal plus the interest already "
                "added, so it grows faster than simple interest.",
            )
        ],
    ),
    Tool(
        "water_plants",
        "Run the garden irrigation in a zone.",
        {"zone": S(enum=["front", "back", "greenhouse"]), "minutes": I()},
        ["zone", "minutes"],
        ["Water the {zone} garden for {minutes} minutes.", "Run the {zone} sprinklers for {minutes} minutes."],
        lambda r: {"zone": r.choice(["front", "back", "greenhouse"]), "minutes": r.choice([5, 10, 15, 20])},
        lambda a, d: {"status": "running"},
        lambda a, r: f"Watering the {a['zone']} zone for {a['minutes']} minutes.",
        vague=[("Water the {zone} garden.", "For how many minutes?", "{minutes}")],
    ),
    Tool(
        "get_player_stats",
        "Season statistics of a player (synthetic).",
        {"player": S(), "stat": S(enum=["points", "assists", "rebounds"]), "season": S()},
        ["player", "stat"],
        ["How many {stat} does {player} have this season?", "{player}'s {stat} in the {season} season?"],
        lambda r: {
            "player": r.choice(PLAYERS),
            "stat": r.choice(["points", "assists", "rebounds"]),
            "season": r.choice(["2025-26", "2026-27"]),
        },
        lambda a, d: {"value": n(d, 0, 40, 900)},
        lambda a, r: f"{a['player']} has {r['value']} {a['stat']} (synthetic).",
    ),
    Tool(
        "find_podcast",
        "Search podcast episodes.",
        {"topic": S(), "max_duration_minutes": I(), "language": S(enum=["english", "spanish", "german"])},
        ["topic"],
        ["Find a podcast about {topic}.", "A {language} podcast on {topic} under {max_duration_minutes} minutes?"],
        lambda r: {
            "topic": r.choice(["astronomy", "woodworking", "chess", "urban gardening"]),
            "max_duration_minutes": r.choice([20, 30, 45]),
            "language": r.choice(["english", "spanish", "german"]),
        },
        lambda a, d: {"episodes": n(d, 0, 1, 9)},
        lambda a, r: f"I found {r['episodes']} episodes about {a['topic']}.",
    ),
    Tool(
        "register_guest",
        "Register a guest for an event.",
        {"event_id": S(), "guest": O({"name": S(), "email": S()}, ["name", "email"]), "dietary": A(S())},
        ["event_id", "guest"],
        ["Register {guest} for event {event_id}.", "Sign {guest} up for {event_id}; dietary needs: {dietary}."],
        lambda r: (
            lambda g: {
                "event_id": f"EV-{r.randint(100, 999)}",
                "guest": ({"name": g, "email": f"{g.lower()}@example.org"}, f"{g} ({g.lower()}@example.org)"),
                "dietary": r.sample(["vegetarian", "nut-free", "halal"], 1),
            }
        )(r.choice(GUESTS)),
        lambda a, d: {"status": "registered"},
        lambda a, r: f"{a['guest']['name']} is registered for {a['event_id']}.",
    ),
    Tool(
        "get_train_departures",
        "Next departures from a station.",
        {"station": S(), "destination": S(), "limit": I()},
        ["station"],
        ["Next trains from {station}?", "Show the next {limit} trains from {station} to {destination}."],
        lambda r: dict(zip(["station", "destination"], r.sample(STATIONS, 2)), limit=r.choice([2, 3, 4])),
        lambda a, d: {"next": f"{n(d, 0, 6, 22):02d}:{n(d, 1, 0, 5)}5"},
        lambda a, r: f"The next train from {a['station']} leaves at {r['next']}.",
        vague=[("When's the next train to {destination}?", "Which station are you leaving from?", "{station}")],
    ),
]
# Related questions the offered tool cannot answer (the eval's `near` rows), for the tools above without one.
MORE_NEAR = {
    "get_air_quality": ("What does an AQI of 160 mean?", "On the US scale, 151-200 is unhealthy for everyone."),
    "rent_car": ("What does an SUV stand for?", "Sport utility vehicle."),
    "water_plants": ("How often should I water a cactus?", "Rarely: about every two to four weeks in summer, less in "
                     "winter, letting the soil dry out fully."),
    "get_player_stats": ("How many points is a three-pointer worth in basketball?", "Three points."),
    "find_podcast": ("What is a podcast?", "A series of audio episodes you can download or stream."),
    "register_guest": ("How far ahead should I send wedding invitations?", "Usually six to eight weeks before."),
    "get_train_departures": ("What is the gauge of most European railways?", "Standard gauge: 1,435 mm."),
}  # fmt: skip
for _tool in EVAL_TOOLS:
    _tool.near = _tool.near + ([MORE_NEAR[_tool.name]] if _tool.name in MORE_NEAR else [])
EVAL_BY_NAME = {t.name: t for t in EVAL_TOOLS}
