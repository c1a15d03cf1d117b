"""Training tools: the five original tools, finance, calendar, email, travel, maps and shopping."""

from __future__ import annotations

from .common import convert, safe_eval
from .schema import A, B, I, N, S, Tool
from .tool_values import CITIES, DATES, EMAILS, PRODUCTS, RATES, SYMBOLS, TIMES, TZ, UNIT_PAIRS, UNITS, n, r2


def _units(rng):
    a, b = rng.choice(UNIT_PAIRS)
    return {"value": rng.choice([3, 5, 12, 20, 42, 75, 100, 250, 1.5, 6.2]), "from_unit": a, "to_unit": b}


def _expr(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    return {"expression": rng.choice([f"{a} + {b} * {c}", f"({a} + {b}) * {c}", f"{a * c} / {c}", f"{c} ** 2 - {b}",
                                      f"{a * 37} % {c}", f"{a} * {b} - {c}"])}  # fmt: skip


def _calc(args, d):
    expr = args["expression"]
    value = safe_eval(expr)
    return {"expression": expr, "result": round(value, 6)}


CORE_TOOLS: list[Tool] = [
    Tool(
        "get_weather",
        "Get the weather for a city (synthetic demo data).",
        {"city": S("City name"), "date": S("YYYY-MM-DD; omit for today"), "unit": S(enum=["celsius", "fahrenheit"])},
        ["city"],
        [
            "What's the weather in {city}?",
            "How's the weather in {city} today?",
            "Weather for {city}, please.",
            "What's the forecast for {city} on {date}?",
            "What's the weather in {city} in {unit}?",
            "Weather in {city} on {date}, in {unit} please.",
        ],
        lambda r: {"city": r.choice(CITIES), "date": r.choice(DATES), "unit": r.choice(["celsius", "fahrenheit"])},
        lambda a, d: {
            **a,
            "temperature": n(d, 0, -5, 30),
            "condition": ["sunny", "cloudy", "rainy", "windy"][d[1] % 4],
        },
        lambda a, r: f"It's {r['temperature']}° and {r['condition']} in {a['city']} (synthetic data).",
        vague=[
            ("What's the weather like today?", "Which city should I check the weather for?", "{city}, please."),
            ("Will I need an umbrella on {date}?", "Which city are you asking about?", "In {city}."),
        ],
        near=[
            (
                "Why do clouds form?",
                "Clouds form when moist air rises and cools until its water vapour condenses "
                "into tiny droplets or ice crystals.",
            ),
            (
                "What was the hottest temperature ever recorded on Earth?",
                "I can't look up historical records "
                "with the weather tool; it only gives current or dated forecasts for a city.",
            ),
        ],
        ability="check the (synthetic) weather for a city",
    ),
    Tool(
        "convert_units",
        "Convert a value between units of length, mass or temperature.",
        {"value": N(), "from_unit": S(enum=UNITS), "to_unit": S(enum=UNITS)},
        ["value", "from_unit", "to_unit"],
        [
            "Convert {value} {from_unit} to {to_unit}.",
            "How many {to_unit} is {value} {from_unit}?",
            "What is {value} {from_unit} in {to_unit}?",
        ],
        _units,
        lambda a, d: {**a, "result": r2(convert(a["value"], a["from_unit"], a["to_unit"]))},
        lambda a, r: f"{a['value']} {a['from_unit']} is {r['result']} {a['to_unit']}.",
        vague=[("Convert {value} {from_unit} for me.", "Which unit should I convert it to?", "To {to_unit}.")],
        near=[("Which is longer, a mile or a kilometre?", "A mile is longer: 1 mile is about 1.609 kilometres.")],
        ability="convert lengths, masses and temperatures",
    ),
    Tool(
        "calculator",
        "Evaluate an arithmetic expression with + - * / % ** and parentheses.",
        {"expression": S()},
        ["expression"],
        ["What is {expression}?", "Calculate {expression}.", "Compute {expression} for me."],
        _expr,
        _calc,
        lambda a, r: f"{a['expression']} = {r['result']}.",
        vague=[("Can you calculate something for me?", "Sure, what expression should I evaluate?", "{expression}")],
        near=[
            (
                "What does the % operator mean in Python?",
                "In Python, % is the remainder (modulo) operator: 7 % 3 is 1.",
            )
        ],
        ability="evaluate arithmetic expressions",
    ),
    Tool(
        "currency_convert",
        "Convert money between currencies using a fixed illustrative rate table (not live rates).",
        {"amount": N(), "from_currency": S("ISO 4217 code, e.g. USD"), "to_currency": S("ISO 4217 code")},
        ["amount", "from_currency", "to_currency"],
        [
            "Convert {amount} {from_currency} to {to_currency}.",
            "How much is {amount} {from_currency} in {to_currency}?",
        ],
        lambda r: dict(
            zip(["from_currency", "to_currency"], r.sample(list(RATES), 2)),
            amount=r.choice([20, 50, 75, 120, 300, 999, 19.99]),
        ),
        lambda a, d: {
            **a,
            "converted": r2(a["amount"] * RATES[a["to_currency"]] / RATES[a["from_currency"]]),
            "note": "illustrative fixed rate",
        },
        lambda a, r: (
            f"{a['amount']} {a['from_currency']} is about {r['converted']} {a['to_currency']} "
            "(illustrative fixed rate)."
        ),
        vague=[
            (
                "How much is {amount} {from_currency} worth?",
                "Which currency should I convert it to?",
                "In {to_currency}.",
            )
        ],
        near=[("Is the euro used in Switzerland?", "No. Switzerland uses the Swiss franc (CHF), not the euro.")],
        ability="convert money between currencies at fixed illustrative rates",
    ),
    Tool(
        "get_time_in_timezone",
        "Local time in an IANA timezone (fixed standard offsets, no DST).",
        {"timezone": S("IANA name, e.g. Asia/Tokyo"), "utc_time": S("HH:MM in UTC to convert; omit for now")},
        ["timezone"],
        ["What time is it in the {timezone} timezone?", "When it's {utc_time} UTC, what time is it in {timezone}?"],
        lambda r: {"timezone": TZ[r.choice(list(TZ))], "utc_time": r.choice(TIMES)},
        lambda a, d: {**a, "local_time": f"{n(d, 0, 0, 23):02d}:{n(d, 1, 0, 11) * 5:02d}"},
        lambda a, r: f"It's {r['local_time']} in {a['timezone']}.",
        near=[("How many time zones does Russia have?", "Russia has 11 time zones.")],
        ability="tell the local time in a timezone",
    ),
]

CORE_TOOLS += [
    Tool(
        "get_stock_quote",
        "Latest price of a stock ticker (synthetic demo quotes).",
        {"symbol": S("Ticker symbol"), "exchange": S(enum=["NASDAQ", "NYSE", "LSE"])},
        ["symbol"],
        ["What's {symbol} trading at?", "Get me a quote for {symbol}.", "Price of {symbol} on the {exchange}?"],
        lambda r: {"symbol": r.choice(SYMBOLS), "exchange": r.choice(["NASDAQ", "NYSE", "LSE"])},
        lambda a, d: {**a, "price": n(d, 0, 10, 400) + d[1] % 100 / 100, "currency": "USD"},
        lambda a, r: f"{a['symbol']} is at {r['price']} USD (synthetic quote).",
        vague=[("What's the stock price right now?", "Which ticker symbol should I look up?", "{symbol}")],
        near=[
            (
                "What is a stock split?",
                "A stock split divides each existing share into several shares; the "
                "price per share falls in proportion, so the total value stays the same.",
            )
        ],
        ability="look up (synthetic) stock quotes",
    ),
    Tool(
        "create_calendar_event",
        "Create an event in the user's calendar.",
        {
            "title": S(),
            "date": S("YYYY-MM-DD"),
            "start_time": S("HH:MM"),
            "duration_minutes": I(),
            "attendees": A(S(), "Email addresses"),
        },
        ["title", "date", "start_time"],
        [
            "Put '{title}' in my calendar on {date} at {start_time}.",
            "Schedule '{title}' for {date} at {start_time}, {duration_minutes} minutes long.",
            "Create an event '{title}' on {date} at {start_time} with {attendees}.",
        ],
        lambda r: {
            "title": r.choice(["Team sync", "Dentist", "Budget review", "Lunch with Ana", "Yoga class"]),
            "date": r.choice(DATES),
            "start_time": r.choice(TIMES),
            "duration_minutes": r.choice([15, 30, 45, 60, 90]),
            "attendees": r.sample(EMAILS, 2),
        },
        lambda a, d: {"event_id": f"evt_{d[0]:02x}{d[1]:02x}", "status": "created"},
        lambda a, r: f"Done: '{a['title']}' is in your calendar on {a['date']} at {a['start_time']}.",
        vague=[
            ("Add '{title}' to my calendar at {start_time}.", "Which date should I put it on?", "On {date}."),
            ("Schedule a meeting for {date} at {start_time}.", "What should I call the event?", "Call it '{title}'."),
        ],
        near=[("How many days are there in a leap year?", "A leap year has 366 days.")],
        ability="create calendar events",
    ),
    Tool(
        "list_calendar_events",
        "List the user's calendar events on a day.",
        {"date": S("YYYY-MM-DD"), "calendar": S(enum=["work", "personal"])},
        ["date"],
        ["What's on my calendar on {date}?", "Show my {calendar} events for {date}."],
        lambda r: {"date": r.choice(DATES), "calendar": r.choice(["work", "personal"])},
        lambda a, d: {"date": a["date"], "events": [{"time": TIMES[d[0] % 9], "title": "Planning"}]},
        lambda a, r: f"On {a['date']} you have 'Planning' at {r['events'][0]['time']}.",
        vague=[("What's on my calendar?", "Which day should I check?", "{date}")],
        ability="list calendar events",
    ),
    Tool(
        "send_email",
        "Send an email.",
        {"to": S("Recipient address"), "subject": S(), "body": S(), "cc": A(S())},
        ["to", "subject", "body"],
        [
            "Email {to} with the subject '{subject}' saying: {body}",
            "Send an email to {to}, subject '{subject}', body '{body}', and cc {cc}.",
        ],
        lambda r: {
            "to": r.choice(EMAILS),
            "subject": r.choice(["Running late", "Agenda", "Invoice", "Thanks!"]),
            "body": r.choice(["I'll be 10 minutes late.", "See the agenda attached.", "Thanks for today."]),
            "cc": r.sample(EMAILS, 1),
        },
        lambda a, d: {"status": "sent", "message_id": f"msg_{d[0]:02x}{d[2]:02x}"},
        lambda a, r: f"Your email '{a['subject']}' to {a['to']} has been sent.",
        vague=[("Send an email to {to} saying: {body}", "What subject line should it have?", "'{subject}'")],
        near=[
            (
                "Can you send a text message to my mom?",
                "I can't send text messages: I only have an email tool "
                "here. I can email her if you give me her address.",
            )
        ],
        ability="send emails",
    ),
    Tool(
        "search_emails",
        "Search the user's mailbox.",
        {"query": S(), "unread_only": B(), "limit": I("Max results")},
        ["query"],
        [
            "Find emails about {query}.",
            "Search my unread emails for {query}.|unread_only",
            "Show the {limit} latest emails about {query}.",
        ],
        lambda r: {
            "query": r.choice(["invoice", "flight", "meeting notes", "password reset", "newsletter"]),
            "unread_only": True,
            "limit": r.choice([3, 5, 10]),
        },
        lambda a, d: {"count": n(d, 0, 0, 9)},
        lambda a, r: f"I found {r['count']} emails matching '{a['query']}'.",
        ability="search your mailbox",
    ),
    Tool(
        "search_flights",
        "Search flights between two airports (synthetic fares).",
        {
            "origin": S("IATA code"),
            "destination": S("IATA code"),
            "date": S("YYYY-MM-DD"),
            "passengers": I(),
            "cabin": S(enum=["economy", "premium_economy", "business"]),
        },
        ["origin", "destination", "date"],
        [
            "Find flights from {origin} to {destination} on {date}.",
            "Flights {origin} to {destination} on {date} for {passengers} passengers?",
            "Search {cabin} flights from {origin} to {destination} on {date}.",
        ],
        lambda r: dict(
            zip(
                ["origin", "destination"],
                r.sample(["LHR", "JFK", "CDG", "NRT", "SFO", "BER", "MAD", "YYZ", "SYD", "DXB"], 2),
            ),
            date=r.choice(DATES),
            passengers=r.randint(2, 5),
            cabin=r.choice(["economy", "premium_economy", "business"]),
        ),
        lambda a, d: {"cheapest_fare": n(d, 0, 90, 250) * 4, "currency": "USD", "flights_found": n(d, 1, 2, 12)},
        lambda a, r: (
            f"I found {r['flights_found']} flights from {a['origin']} to {a['destination']}; the cheapest "
            f"is {r['cheapest_fare']} USD (synthetic fare)."
        ),
        vague=[
            ("Find me a flight to {destination} on {date}.", "Which airport are you flying from?", "From {origin}."),
            ("I need a flight from {origin} to {destination}.", "What date do you want to fly?", "On {date}."),
        ],
        near=[
            (
                "What's the best seat on a plane to avoid turbulence?",
                "Seats over the wings usually feel the "
                "least turbulence, because they are closest to the plane's centre of gravity.",
            )
        ],
        ability="search flights",
    ),
    Tool(
        "book_hotel",
        "Book a hotel room.",
        {"city": S(), "check_in": S("YYYY-MM-DD"), "nights": I(), "guests": I()},
        ["city", "check_in", "nights"],
        [
            "Book a hotel in {city} from {check_in} for {nights} nights.",
            "I need a room in {city} checking in {check_in}, {nights} nights, {guests} guests.",
        ],
        lambda r: {
            "city": r.choice(CITIES),
            "check_in": r.choice(DATES),
            "nights": r.randint(1, 7),
            "guests": r.randint(2, 4),
        },
        lambda a, d: {"confirmation": f"HB{d[0]:03d}{d[1]:03d}", "status": "booked"},
        lambda a, r: (
            f"Booked: {a['nights']} nights in {a['city']} from {a['check_in']} (confirmation {r['confirmation']})."
        ),
        vague=[("Book me a hotel in {city} for {nights} nights.", "What's your check-in date?", "{check_in}")],
        ability="book hotels",
    ),
    Tool(
        "get_directions",
        "Directions and travel time between two places.",
        {"origin": S(), "destination": S(), "mode": S(enum=["driving", "walking", "cycling", "transit"])},
        ["origin", "destination"],
        ["How do I get from {origin} to {destination}?", "Directions from {origin} to {destination} by {mode}."],
        lambda r: dict(
            zip(
                ["origin", "destination"],
                r.sample(
                    [
                        "the central station",
                        "the airport",
                        "the old town",
                        "the university",
                        "the harbour",
                        "the stadium",
                    ],
                    2,
                ),
            ),
            mode=r.choice(["driving", "walking", "cycling", "transit"]),
        ),
        lambda a, d: {"minutes": n(d, 0, 8, 70), "distance_km": n(d, 1, 2, 40)},
        lambda a, r: (
            f"It's {r['distance_km']} km from {a['origin']} to {a['destination']}, about {r['minutes']} minutes."
        ),
        vague=[("How do I get to {destination}?", "Where are you starting from?", "From {origin}.")],
        ability="give directions",
    ),
    Tool(
        "find_nearby_places",
        "Find places of a category near a location.",
        {"location": S(), "category": S(enum=["cafe", "pharmacy", "restaurant", "museum", "park"]), "radius_km": N()},
        ["location", "category"],
        ["Find a {category} near {location}.", "Any {category} within {radius_km} km of {location}?"],
        lambda r: {
            "location": r.choice(["Union Square", "the Old Port", "Central Park West", "Market Street"]),
            "category": r.choice(["cafe", "pharmacy", "restaurant", "museum", "park"]),
            "radius_km": r.choice([0.5, 1, 2, 5]),
        },
        lambda a, d: {"results": n(d, 0, 1, 8)},
        lambda a, r: f"There are {r['results']} places of that kind near {a['location']}.",
        near=[
            (
                "What's the difference between a cafe and a bistro?",
                "A cafe mainly serves coffee and light "
                "snacks; a bistro is a small restaurant serving simple full meals.",
            )
        ],
        ability="find places nearby",
    ),
    Tool(
        "search_products",
        "Search the shop's catalogue.",
        {"query": S(), "max_price": N("In USD"), "in_stock_only": B()},
        ["query"],
        [
            "Search the shop for a {query}.",
            "Find a {query} under {max_price} dollars.",
            "Look for a {query} that's in stock.|in_stock_only",
        ],
        lambda r: {"query": r.choice(PRODUCTS), "max_price": r.choice([15, 25, 40, 60, 99.99]), "in_stock_only": True},
        lambda a, d: {"matches": n(d, 0, 0, 20), "cheapest": n(d, 1, 5, 80) + 0.99},
        lambda a, r: f"I found {r['matches']} results for '{a['query']}'; the cheapest is {r['cheapest']} USD.",
        ability="search the shop",
    ),
    Tool(
        "add_to_cart",
        "Add a product to the shopping cart.",
        {"product_id": S(), "quantity": I()},
        ["product_id", "quantity"],
        ["Add {quantity} of product {product_id} to my cart.", "Put {quantity} x {product_id} in the cart."],
        lambda r: {"product_id": f"P-{r.randint(1000, 9999)}", "quantity": r.randint(1, 6)},
        lambda a, d: {"status": "added", "cart_items": a["quantity"] + d[0] % 4},
        lambda a, r: f"Added {a['quantity']} of {a['product_id']} to your cart.",
        vague=[("Add {quantity} of those to my cart.", "Which product ID should I add?", "{product_id}")],
        ability="add products to your cart",
    ),
    Tool(
        "track_order",
        "Track a shop order.",
        {"order_id": S()},
        ["order_id"],
        ["Where is my order {order_id}?", "Track order {order_id}."],
        lambda r: {"order_id": f"ORD-{r.randint(10000, 99999)}"},
        lambda a, d: {"status": ["processing", "shipped", "out for delivery", "delivered"][d[0] % 4]},
        lambda a, r: f"Order {a['order_id']} is {r['status']}.",
        vague=[("Where's my package?", "What's the order number?", "It's {order_id}.")],
        near=[
            (
                "How long do I have to return an item usually?",
                "Many shops allow returns within 14 to 30 days, but the exact window depends on the shop's policy.",
            )
        ],
        ability="track orders",
    ),
]
