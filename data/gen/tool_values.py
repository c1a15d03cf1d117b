"""Value pools and small helpers for the training tool catalog (all values made up)."""

from __future__ import annotations

CITIES = ["Oslo", "Paris", "Lima", "Tokyo", "Cairo", "Sydney", "Toronto", "Berlin", "Madrid", "Nairobi", "Seoul",
          "Chicago", "Lisbon", "Vienna", "Prague", "Dublin", "Athens", "Rome", "Denver", "Helsinki"]  # fmt: skip
DATES = ["2026-01-14", "2026-02-03", "2026-03-21", "2026-04-09", "2026-05-30", "2026-06-12", "2026-07-04",
         "2026-08-18", "2026-09-25", "2026-10-07", "2026-11-16", "2026-12-01"]  # fmt: skip
TIMES = ["08:30", "09:00", "10:15", "11:45", "13:00", "14:30", "16:00", "17:45", "19:30"]
PEOPLE = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo"]
ROOMS = ["living room", "kitchen", "bedroom", "office", "hallway", "bathroom"]
UNITS = ["mm", "cm", "m", "km", "in", "ft", "yd", "mi", "g", "kg", "oz", "lb", "celsius", "fahrenheit", "kelvin"]
UNIT_PAIRS = [("km", "mi"), ("mi", "km"), ("kg", "lb"), ("lb", "kg"), ("cm", "in"), ("in", "cm"), ("m", "ft"),
              ("ft", "m"), ("g", "oz"), ("oz", "g"), ("celsius", "fahrenheit"), ("fahrenheit", "celsius"),
              ("celsius", "kelvin"), ("yd", "m")]  # fmt: skip
RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.9, "CAD": 1.36, "AUD": 1.52, "SEK": 10.5,
         "INR": 83.0, "MXN": 17.0}  # fmt: skip
TZ = {"Tokyo": "Asia/Tokyo", "London": "Europe/London", "New York": "America/New_York", "Mumbai": "Asia/Kolkata",
      "Sydney": "Australia/Sydney", "Berlin": "Europe/Berlin", "Los Angeles": "America/Los_Angeles",
      "Shanghai": "Asia/Shanghai", "Nairobi": "Africa/Nairobi", "Chicago": "America/Chicago"}  # fmt: skip


def n(d: bytes, i: int, lo: int, hi: int) -> int:
    """A number in [lo, hi] from byte i of a digest."""
    return lo + d[i] % (hi - lo + 1)


def r2(x: float) -> float:
    return round(x + 0.0, 2)


SYMBOLS = ["ACME", "GLOBX", "NOVA", "ZENTR", "QUILL", "ORBIT", "LUMEN", "PYRO"]  # made-up tickers
PRODUCTS = ["wireless mouse", "desk lamp", "yoga mat", "water bottle", "phone charger", "backpack", "coffee grinder",
            "running shoes", "notebook", "bluetooth speaker"]  # fmt: skip
SONGS = ["Blue Hour", "Paper Boats", "Northern Lights", "Slow River", "City of Glass", "Morning Tide", "Ember",
         "Static Dreams", "Golden Fields", "Night Train"]  # fmt: skip
INGREDIENTS = ["chickpeas", "spinach", "tomatoes", "rice", "eggs", "mushrooms", "lentils", "tofu", "potatoes",
               "zucchini", "feta", "basil"]  # fmt: skip
TEAMS = ["Riverton Rockets", "Lakeside Lynx", "Harbor City Hawks", "Pine Valley Pumas", "Summit Sharks",
         "Eastgate Eagles"]  # made-up teams  # fmt: skip
LEAGUES = ["North Coast League", "Metro Premier", "Valley Cup", "Island Series"]  # made-up leagues
LANGS = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese"]
PATHS = [
    "/home/sam/notes.txt",
    "/var/log/app.log",
    "/srv/data/report.csv",
    "/home/sam/todo.md",
    "/etc/app/config.yaml",
]
DIRS = ["/home/sam", "/srv/data", "/var/log", "/home/sam/projects", "/tmp/build"]
DBS = ["sales", "inventory", "hr", "analytics"]
QUERIES = ["SELECT COUNT(*) FROM orders", "SELECT name FROM products WHERE price > 20",
           "SELECT region, SUM(total) FROM orders GROUP BY region", "SELECT * FROM staff LIMIT 5"]  # fmt: skip
STREETS = ["12 Elm Street", "48 Harbour Road", "7 Mill Lane", "230 Park Avenue", "5 Station Square"]
POSTCODES = ["10115", "75004", "SW1A 1AA", "02139", "1010"]
EMAILS = [f"{p.lower()}@example.com" for p in PEOPLE]
