"""Requests that need no tool, answered directly: general knowledge, small talk and arithmetic. The `EVAL_*` lists
are held out. Every answer is a plain fact or computed here.
"""

from __future__ import annotations

KNOWLEDGE_TRAIN = [
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many continents are there?", "There are seven continents."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote 'Pride and Prejudice' (1813)."),
    ("What is the boiling point of water at sea level?", "100 °C (212 °F) at sea level."),
    ("What does CPU stand for?", "Central processing unit."),
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What language is mainly spoken in Brazil?", "Portuguese."),
    (
        "What is photosynthesis?",
        "The process by which plants use light, water and carbon dioxide to make sugar and release oxygen.",
    ),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("What is the chemical symbol for gold?", "Au."),
    ("How many minutes are in a day?", "1,440 minutes (24 × 60)."),
    ("What is a haiku?", "A short Japanese poem of three lines with 5, 7 and 5 syllables."),
    ("What's the square root of 144?", "12."),
    ("Write a one-line Python function that doubles a number.", "def double(x): return 2 * x"),
    ("What is the difference between a list and a tuple in Python?", "A list is mutable; a tuple is immutable."),
    ("Give me a synonym for 'happy'.", "Joyful."),
    ("What's the opposite of 'ancient'?", "Modern."),
    ("How many sides does a hexagon have?", "Six."),
    ("Which ocean is the largest?", "The Pacific Ocean."),
    ("What is the freezing point of water in Fahrenheit?", "32 °F."),
    ("Tell me a fun fact about octopuses.", "Octopuses have three hearts and blue blood."),
    ("What is HTTP?", "HyperText Transfer Protocol, the protocol web browsers and servers use to exchange pages."),
    (
        "Explain what a variable is in programming.",
        "A named place that stores a value your program can read and change.",
    ),
    ("What year did the first person walk on the Moon?", "1969 (Apollo 11)."),
    (
        "Summarise the plot of Romeo and Juliet in one sentence.",
        "Two young lovers from feuding families in Verona "
        "marry in secret, and a chain of misunderstandings ends in both their deaths.",
    ),
    ("How many bytes are in a kilobyte?", "1,000 bytes in the SI definition (1,024 in the binary kibibyte)."),
    ("What is the speed of light?", "About 299,792 km per second in a vacuum."),
    ("Can you suggest a name for a pet turtle?", "How about 'Shelly'?"),
    ("What rhymes with 'cat'?", "Hat, bat, mat and sat."),
]
KNOWLEDGE_EVAL = [
    ("What is the capital of Australia?", "Canberra."),
    ("How many strings does a standard violin have?", "Four."),
    ("Who developed the theory of general relativity?", "Albert Einstein."),
    ("What gas do humans exhale that plants absorb?", "Carbon dioxide."),
    ("What does RAM stand for?", "Random-access memory."),
    ("Give me an antonym of 'generous'.", "Stingy."),
]
SMALL_TALK_TRAIN = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("Thanks, that's all.", "You're welcome! Have a great day."),
    ("Who are you?", "I'm an AI assistant. I can answer questions and use the tools available in this chat."),
    ("Tell me a joke.", "Why did the programmer quit? They didn't get arrays."),
    ("How are you?", "I'm doing well, thanks! How can I help?"),
]
SMALL_TALK_EVAL = [("Hey, good evening!", "Good evening! How can I help you?")]
