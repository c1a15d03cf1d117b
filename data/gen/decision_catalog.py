"""The held-out decision split's tools: the 10 held-out tools of `eval_catalog` (copies, with a clarifying question
and a related question each) and 10 more that never occur in any training file, each the near miss of one of them
(cancel a reservation / reserve a table, surf / tides, injuries / season statistics, ...). A request for one of a
pair with only the other offered is a "no offered tool fits" row whose nearest tool almost fits. Synthetic values.
"""

from __future__ import annotations

import dataclasses

from .eval_catalog import EVAL_DATES, EVAL_TOOLS, GUESTS, PLAYERS, RESTAURANTS, STATIONS
from .schema import B, I, N, S, Tool
from .tool_values import n

BEACHES = ["Hossegor", "Bundoran", "Mundaka", "Praia do Guincho"]
PODCASTS = ["Deep Sky Weekly", "Joinery Hour", "Endgame Talk", "Balcony Harvest"]
EVAL_CITIES = ["Quito", "Tallinn", "Porto", "Accra", "Busan"]

NEW_TOOLS: list[Tool] = [
    Tool(
        "cancel_reservation", "Cancel a restaurant reservation.",
        {"restaurant": S(), "date": S("YYYY-MM-DD")}, ["restaurant", "date"],
        ["Cancel my reservation at {restaurant} on {date}.", "Please call off the {date} booking at {restaurant}."],
        lambda r: {"restaurant": r.choice(RESTAURANTS), "date": r.choice(EVAL_DATES)},
        lambda a, d: {"status": "cancelled"},
        lambda a, r: f"Your {a['date']} reservation at {a['restaurant']} is cancelled.",
        vague=[("Cancel my reservation at {restaurant}.", "Which date is the reservation for?", "{date}")],
        near=[("Is it rude to cancel a restaurant booking on the same day?", "Not if you call as early as you can; "
               "some restaurants charge a fee for late cancellations.")],
    ),
    Tool(
        "get_surf_forecast", "Wave height and period at a beach (synthetic).",
        {"beach": S(), "date": S("YYYY-MM-DD")}, ["beach"],
        ["What are the waves like at {beach}?", "Surf forecast for {beach} on {date}?"],
        lambda r: {"beach": r.choice(BEACHES), "date": r.choice(EVAL_DATES)},
        lambda a, d: {"wave_height_m": n(d, 0, 5, 30) / 10, "period_s": n(d, 1, 6, 16)},
        lambda a, r: f"Waves of {r['wave_height_m']} m every {r['period_s']} s at {a['beach']} (synthetic).",
        vague=[("What's the surf forecast for {date}?", "Which beach do you mean?", "{beach}")],
        near=[("What is a rip current?", "A strong, narrow current flowing away from the shore; to get out of one, "
               "swim parallel to the beach.")],
    ),
    Tool(
        "extend_car_rental", "Extend an existing car rental.",
        {"booking_id": S(), "extra_days": I()}, ["booking_id", "extra_days"],
        ["Extend rental {booking_id} by {extra_days} days.", "Add {extra_days} more days to my car rental "
         "{booking_id}."],
        lambda r: {"booking_id": f"CR-{r.randint(1000, 9999)}", "extra_days": r.randint(2, 6)},
        lambda a, d: {"status": "extended"},
        lambda a, r: f"Rental {a['booking_id']} is extended by {a['extra_days']} days.",
        vague=[("Extend my car rental {booking_id}, please.", "By how many days?", "{extra_days}")],
        near=[("Do I need an international driving permit to rent a car abroad?", "It depends on the country: many "
               "ask for one next to your licence, so check with the rental company.")],
    ),
    Tool(
        "calculate_savings_growth", "What a deposit grows to with yearly compound interest.",
        {"deposit": N(), "annual_rate": N("Percent"), "years": I()}, ["deposit", "annual_rate", "years"],
        ["How much will {deposit} grow to at {annual_rate}% over {years} years?",
         "If I save {deposit} at {annual_rate}% interest, what will I have after {years} years?"],
        lambda r: {"deposit": r.choice([1000, 5000, 20000]), "annual_rate": r.choice([2.5, 3, 4.5]),
                   "years": r.choice([3, 8, 20])},
        lambda a, d: {"balance": round(a["deposit"] * (1 + a["annual_rate"] / 100) ** a["years"], 2)},
        lambda a, r: f"It grows to {r['balance']}.",
        vague=[("How much will {deposit} grow to over {years} years?", "What annual interest rate should I use?",
                "{annual_rate}")],
        near=[("What is an APR?", "The annual percentage rate: the yearly cost of borrowing, interest and some fees "
               "included.")],
    ),
    Tool(
        "get_soil_moisture", "Soil moisture in a garden zone (synthetic).",
        {"zone": S(enum=["front", "back", "greenhouse"])}, ["zone"],
        ["How moist is the soil in the {zone} garden?", "Check the soil moisture in the {zone} zone."],
        lambda r: {"zone": r.choice(["front", "back", "greenhouse"])},
        lambda a, d: {"moisture_percent": n(d, 0, 10, 60)},
        lambda a, r: f"The {a['zone']} zone's soil is at {r['moisture_percent']}% moisture (synthetic).",
        vague=[("Is the soil dry?", "Which zone: front, back or greenhouse?", "{zone}")],
        near=[("Why are my tomato leaves turning yellow?", "Often too much water or too little nitrogen; check that "
               "the soil drains well.")],
    ),
    Tool(
        "get_pollen_count", "Pollen count for a city (synthetic).",
        {"city": S(), "pollen_type": S(enum=["grass", "tree", "weed"])}, ["city"],
        ["What's the pollen count in {city}?", "How high is the {pollen_type} pollen in {city}?"],
        lambda r: {"city": r.choice(EVAL_CITIES), "pollen_type": r.choice(["grass", "tree", "weed"])},
        lambda a, d: {"grains_per_m3": n(d, 0, 5, 250)},
        lambda a, r: f"{r['grains_per_m3']} grains per cubic metre in {a['city']} (synthetic).",
        vague=[("How high is the {pollen_type} pollen today?", "Which city are you in?", "{city}")],
        near=[("What is hay fever?", "An allergy to pollen: sneezing, a runny nose and itchy eyes.")],
    ),
    Tool(
        "get_player_injury_status", "Whether a player is injured and when they are expected back (synthetic).",
        {"player": S(), "include_history": B()}, ["player"],
        ["Is {player} injured?", "Is {player} fit to play, and what injuries has {player} had?|include_history"],
        lambda r: {"player": r.choice(PLAYERS), "include_history": True},
        lambda a, d: {"injured": bool(d[0] % 2)},
        lambda a, r: f"{a['player']} is {'injured' if r['injured'] else 'fit'} (synthetic).",
        vague=[("Is he fit to play on Saturday?", "Which player do you mean?", "{player}")],
        near=[("How long is an NBA game?", "48 minutes of play: four 12-minute quarters.")],
    ),
    Tool(
        "subscribe_podcast", "Subscribe to a podcast.",
        {"podcast": S(), "notify": B()}, ["podcast"],
        ["Subscribe me to {podcast}.", "Subscribe to {podcast} and notify me of new episodes.|notify"],
        lambda r: {"podcast": r.choice(PODCASTS), "notify": True},
        lambda a, d: {"status": "subscribed"},
        lambda a, r: f"You're subscribed to {a['podcast']}.",
        vague=[("Subscribe me to that podcast, and notify me of new episodes.|notify",
                "Which podcast should I subscribe to?", "{podcast}")],
        near=[("How long is a typical podcast episode?", "Most run 20 to 60 minutes.")],
    ),
    Tool(
        "cancel_registration", "Cancel a guest's registration for an event.",
        {"event_id": S(), "guest_email": S()}, ["event_id", "guest_email"],
        ["Cancel {guest_email}'s registration for {event_id}.", "Take {guest_email} off the list for event "
         "{event_id}."],
        lambda r: {"event_id": f"EV-{r.randint(100, 999)}", "guest_email": f"{r.choice(GUESTS).lower()}@example.org"},
        lambda a, d: {"status": "cancelled"},
        lambda a, r: f"{a['guest_email']} is no longer registered for {a['event_id']}.",
        vague=[("Cancel {guest_email}'s registration.", "Which event is it for?", "{event_id}")],
        near=[("What does RSVP mean?", "Répondez s'il vous plaît: please reply.")],
    ),
    Tool(
        "buy_train_ticket", "Buy a train ticket.",
        {"origin": S(), "destination": S(), "date": S("YYYY-MM-DD"),
         "travel_class": S(enum=["standard", "first"])}, ["origin", "destination", "date"],
        ["Buy a ticket from {origin} to {destination} on {date}.",
         "Book a {travel_class} class ticket from {origin} to {destination} for {date}."],
        lambda r: dict(zip(["origin", "destination"], r.sample(STATIONS, 2)), date=r.choice(EVAL_DATES),
                       travel_class=r.choice(["standard", "first"])),
        lambda a, d: {"status": "booked", "price": n(d, 0, 12, 80)},
        lambda a, r: f"Booked {a['origin']} to {a['destination']} on {a['date']} ({r['price']}, synthetic).",
        vague=[("Buy a train ticket from {origin} to {destination}.", "Which day do you want to travel?", "{date}")],
        near=[("What is a railcard?", "A discount card that cuts train fares for some groups of travellers.")],
    ),
]  # fmt: skip
# A clarifying question and a related question for the held-out tools without one (copies: the 40-row split stays
# as it was generated).
MORE_VAGUE = {
    "get_air_quality": ("What's the {pollutant} level today?", "Which city do you mean?", "{city}"),
    "calculate_loan_payment": ("Monthly payment on a {principal} loan over {years} years?",
                               "What is the annual interest rate?", "{annual_rate}"),
    "get_player_stats": ("How many {stat} this season?", "Which player do you mean?", "{player}"),
    "find_podcast": ("Find me a {language} podcast.", "What topic are you interested in?", "{topic}"),
    "register_guest": ("Register {guest} for the event.", "What is the event ID?", "{event_id}"),
}  # fmt: skip
OLD = [dataclasses.replace(t, vague=t.vague + [MORE_VAGUE[t.name]] if t.name in MORE_VAGUE else list(t.vague),
                           near=list(t.near)) for t in EVAL_TOOLS]  # fmt: skip
DECISION_TOOLS = OLD + NEW_TOOLS
# Each new tool is the near miss of the held-out tool at the same place, and the other way round.
SIBLINGS = {a.name: [b.name] for a, b in zip(OLD, NEW_TOOLS, strict=True)}
SIBLINGS |= {b.name: [a.name] for a, b in zip(OLD, NEW_TOOLS, strict=True)}
# Near misses among the training tools, for the mining rows (`decisions.py`): the same domain, another action.
TRAIN_SIBLING_PAIRS = [
    ("create_calendar_event", "list_calendar_events"), ("send_email", "search_emails"),
    ("search_flights", "book_hotel"), ("search_products", "add_to_cart"), ("add_to_cart", "track_order"),
    ("read_file", "list_directory"), ("set_thermostat", "control_lights"), ("get_match_score", "get_league_standings"),
    ("play_music", "create_playlist"), ("search_recipes", "scale_recipe"), ("set_reminder", "create_calendar_event"),
    ("convert_units", "currency_convert"), ("get_stock_quote", "currency_convert"),
    ("get_directions", "find_nearby_places"), ("create_support_ticket", "track_order"),
    ("schedule_delivery", "track_order"), ("run_sql_query", "read_file"), ("get_weather", "get_time_in_timezone"),
]  # fmt: skip
TRAIN_SIBLINGS: dict[str, list[str]] = {}
for _a, _b in TRAIN_SIBLING_PAIRS:
    TRAIN_SIBLINGS.setdefault(_a, []).append(_b)
    TRAIN_SIBLINGS.setdefault(_b, []).append(_a)
