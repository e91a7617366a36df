"""Build the shipped training assets: a synthetic English corpus and a byte-level BPE tokenizer.

Everything here is generated procedurally from a fixed seed -- no text is copied from anywhere and nothing is
downloaded.  The corpus is a mix of short stories, town descriptions, animal facts, arithmetic, dialogues,
schedules, recipes and letters built from templates over a few thousand words.  Entity attributes (a
character's pet, home town, job, ...) stay consistent within a document, and world facts (how many legs a
spider has, what a cow eats, ...) stay consistent across the whole corpus, so a small language model has
plenty of structure to pick up within a few dozen optimizer steps.

Usage::

    python scripts/build_assets.py            # writes swarm/assets/corpus.jsonl and swarm/assets/tokenizer.json
    python scripts/build_assets.py --check    # regenerate in memory and verify the files on disk are identical

Running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

logger = logging.getLogger("build_assets")

ASSETS_DIR = Path(__file__).resolve().parent.parent / "swarm" / "assets"
CORPUS_NAME = "corpus.jsonl"
TOKENIZER_NAME = "tokenizer.json"
SEED = 20240611
TARGET_BYTES = 2_400_000
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------------
# Word lists.  Written for this script; ordered lists only (never sets) so that generation is deterministic.
# ----------------------------------------------------------------------------------------------------------

FEMALE_NAMES = """
Anna Mia Lena Clara Rosa Ivy Nora Ella Lucy Maya Zoe Ruby Hazel Iris Daisy Alice Emma Grace Julia Laura
Nina Olive Paula Sara Tessa Vera Wendy Yara Amber Bella Carla Dora Edith Fiona Greta Hanna Ingrid Jade
Kira Lila Mabel Nadia Opal Petra Quinn Rita Sophie Tilda Una Violet Willa Xena Alma Bea Cora Dina Elsa
Faye Gina Holly Ada Jenny Kate Lily Molly Nell Poppy Rhea Stella Tara Uma Wren Agnes Beth Celia Delia
Esme Flora Gwen Hope Isla Joy Lottie Maud Nancy Orla Pearl Sally Thea Ursula Greer Marta Leona Selma
""".split()

MALE_NAMES = """
Tom Leo Ben Sam Max Finn Jack Noah Owen Luke Adam Carl Dan Eli Felix Gus Hugo Ivan Jonah Karl Liam
Milo Nico Oscar Paul Rex Simon Theo Victor Walter Zack Abel Bruno Colin Dean Emil Frank Glen Henry Ian
Jasper Kevin Lars Mark Ned Otto Peter Ralph Seth Toby Ulric Vince Wade Arlo Basil Cyrus Dexter Ezra
Fred George Harold Isaac Joel Kurt Lewis Martin Neil Oliver Percy Rupert Silas Ted Victor Will Alfred
Barney Cedric Douglas Edwin Felix Gordon Hector Jude Kit Lionel Monty Nigel Orson Quentin Roland Stan
""".split()

SURNAMES_A = (
    "Ash Birch Brook Clay Cole Dale Elm Fair Field Frost Glen Green Hall Hill Lake Marsh Moss Oak".split()
)
SURNAMES_B = "wood ford well ton by worth ley more field stone hart man son wick ridge well low bank".split()

PLACE_STARTS = """
Ash Bel Bram Briar Brook Cal Clover Copper Crane Dun Elder Fern Fox Glen Gold Hazel Holly Ivy Kings
Lark Maple Mill Moss North Oak Pebble Pine Raven Red Rose Rush Salt Silver South Stone Thorn Wester
Willow Wolf Amber Bright Cold Deep Far High Little Long Mist Old Swan West Wheat Wren
""".split()
PLACE_ENDS = """
bridge brook bury by combe dale field ford gate ham haven hill holm hurst lake ley marsh mead mere
minster moor mouth port ridge stead stow thorpe ton vale well wick wood
""".split()

RIVER_NAMES = """
Amble Bure Calder Dove Esk Frome Glide Hollow Idle Kennet Lune Mole Nene Otter Plym Rother Swift Tarn
Ure Wey Yare Brent Colne Derwent Eden Fal Granta Isis Lark Medway
""".split()

# Animals: singular, plural, legs, covering, diet, where it lives, sound verb, size.
ANIMALS: List[Tuple[str, str, int, str, str, str, str, str]] = [
    ("cat", "cats", 4, "fur", "fish and meat", "in houses", "meows", "small"),
    ("dog", "dogs", 4, "fur", "meat and bones", "in houses", "barks", "medium-sized"),
    ("horse", "horses", 4, "hair", "grass and hay", "on farms", "neighs", "large"),
    ("cow", "cows", 4, "hair", "grass", "on farms", "moos", "large"),
    ("sheep", "sheep", 4, "wool", "grass", "in fields", "bleats", "medium-sized"),
    ("goat", "goats", 4, "hair", "leaves and grass", "on hills", "bleats", "medium-sized"),
    ("pig", "pigs", 4, "bristles", "almost anything", "on farms", "grunts", "medium-sized"),
    ("duck", "ducks", 2, "feathers", "seeds and snails", "in ponds", "quacks", "small"),
    ("goose", "geese", 2, "feathers", "grass and seeds", "in ponds", "honks", "medium-sized"),
    ("hen", "hens", 2, "feathers", "seeds and worms", "on farms", "clucks", "small"),
    ("owl", "owls", 2, "feathers", "mice", "in woods", "hoots", "small"),
    ("crow", "crows", 2, "feathers", "seeds and scraps", "in trees", "caws", "small"),
    ("robin", "robins", 2, "feathers", "worms and berries", "in gardens", "sings", "tiny"),
    ("swan", "swans", 2, "feathers", "water plants", "in rivers", "hisses", "large"),
    ("fox", "foxes", 4, "fur", "rabbits and berries", "in woods", "yelps", "medium-sized"),
    ("wolf", "wolves", 4, "fur", "deer and rabbits", "in forests", "howls", "large"),
    ("bear", "bears", 4, "fur", "fish and honey", "in forests", "growls", "huge"),
    ("deer", "deer", 4, "fur", "leaves and grass", "in forests", "bellows", "large"),
    ("rabbit", "rabbits", 4, "fur", "carrots and clover", "in burrows", "thumps", "small"),
    ("mouse", "mice", 4, "fur", "seeds and cheese", "in holes", "squeaks", "tiny"),
    ("squirrel", "squirrels", 4, "fur", "nuts and acorns", "in trees", "chatters", "small"),
    ("hedgehog", "hedgehogs", 4, "spines", "beetles and worms", "in hedges", "snuffles", "small"),
    ("badger", "badgers", 4, "fur", "worms and roots", "in setts", "grunts", "medium-sized"),
    ("otter", "otters", 4, "fur", "fish", "in rivers", "whistles", "medium-sized"),
    ("frog", "frogs", 4, "smooth skin", "flies", "in ponds", "croaks", "tiny"),
    ("toad", "toads", 4, "bumpy skin", "slugs and beetles", "in gardens", "croaks", "small"),
    ("snake", "snakes", 0, "scales", "mice and eggs", "in grass", "hisses", "medium-sized"),
    ("lizard", "lizards", 4, "scales", "insects", "on rocks", "hisses", "small"),
    ("turtle", "turtles", 4, "a hard shell", "plants and worms", "in lakes", "hisses", "medium-sized"),
    ("spider", "spiders", 8, "tiny hairs", "flies", "in webs", "stays silent", "tiny"),
    ("bee", "bees", 6, "fuzzy hair", "nectar", "in hives", "buzzes", "tiny"),
    ("ant", "ants", 6, "a hard shell", "crumbs and seeds", "in nests", "stays silent", "tiny"),
    ("beetle", "beetles", 6, "a hard shell", "leaves", "in logs", "clicks", "tiny"),
    ("butterfly", "butterflies", 6, "scaly wings", "nectar", "in meadows", "stays silent", "tiny"),
    ("snail", "snails", 0, "a spiral shell", "leaves", "in gardens", "stays silent", "tiny"),
    ("crab", "crabs", 10, "a hard shell", "seaweed and worms", "on beaches", "clicks", "small"),
    ("octopus", "octopuses", 8, "soft skin", "crabs and fish", "in the sea", "stays silent", "medium-sized"),
    ("whale", "whales", 0, "smooth skin", "tiny shrimp", "in the ocean", "sings", "huge"),
    ("dolphin", "dolphins", 0, "smooth skin", "fish", "in the sea", "clicks", "large"),
    ("seal", "seals", 0, "short fur", "fish", "on rocky shores", "barks", "large"),
    ("penguin", "penguins", 2, "feathers", "fish", "on icy shores", "brays", "medium-sized"),
    ("camel", "camels", 4, "shaggy hair", "dry plants", "in deserts", "groans", "huge"),
    ("lion", "lions", 4, "fur", "zebras", "in grasslands", "roars", "large"),
    ("tiger", "tigers", 4, "striped fur", "deer", "in jungles", "roars", "large"),
    ("elephant", "elephants", 4, "thick skin", "grass and fruit", "in grasslands", "trumpets", "huge"),
    ("giraffe", "giraffes", 4, "spotted fur", "leaves", "in grasslands", "hums", "huge"),
    ("zebra", "zebras", 4, "striped hair", "grass", "in grasslands", "brays", "large"),
    ("monkey", "monkeys", 4, "fur", "fruit", "in jungles", "chatters", "medium-sized"),
    ("parrot", "parrots", 2, "bright feathers", "seeds and fruit", "in jungles", "squawks", "small"),
    ("bat", "bats", 2, "fur", "moths", "in caves", "squeaks", "tiny"),
]
ANIMAL_BY_NAME = {a[0]: a for a in ANIMALS}
PET_KINDS = [
    "cat",
    "dog",
    "rabbit",
    "hen",
    "duck",
    "goat",
    "parrot",
    "mouse",
    "turtle",
    "hedgehog",
    "pig",
    "horse",
    "goose",
    "frog",
    "snail",
    "lizard",
]
WILD_KINDS = [
    "fox",
    "owl",
    "deer",
    "squirrel",
    "badger",
    "hedgehog",
    "rabbit",
    "crow",
    "robin",
    "frog",
    "otter",
    "swan",
    "duck",
    "bat",
    "beetle",
    "butterfly",
    "snail",
    "spider",
    "bee",
    "toad",
    "wolf",
    "bear",
    "snake",
    "lizard",
    "mouse",
]

PET_NAMES = """
Pip Biscuit Pepper Button Clover Mittens Socks Rusty Pebble Maple Nutmeg Ziggy Bramble Patch Toffee
Sprout Waffle Noodle Fudge Pickle Tansy Whisker Bounce Crumb Dusty Fern Juniper Marble Muffin Olive
Pumpkin Rascal Shadow Sunny Thistle Tumble Velvet Wobble Acorn Bean Cinder Dot Echo Fig Ginger Hopper
Inky Jelly Kip Lolly Moss Nibbles Oats Puddle Quill Ripple Scout Tiger Umber Wisp Yoyo Zest
""".split()

COLOURS = """
red blue green yellow orange purple pink brown black white grey golden silver cream
""".split()
ANIMAL_COLOURS = [
    "black",
    "white",
    "grey",
    "brown",
    "golden",
    "orange",
    "cream",
    "spotted",
    "striped",
    "sandy",
    "speckled",
    "ginger",
]

JOBS = [
    ("baker", "bakes bread in the early morning", "bakery"),
    ("farmer", "grows wheat and potatoes", "farm"),
    ("teacher", "teaches children to read and count", "school"),
    ("doctor", "looks after sick people", "clinic"),
    ("fisher", "catches fish in the bay", "harbour"),
    ("carpenter", "builds tables and chairs", "workshop"),
    ("painter", "paints pictures of the hills", "studio"),
    ("librarian", "looks after thousands of books", "library"),
    ("gardener", "grows roses and beans", "garden"),
    ("tailor", "sews coats and shirts", "shop"),
    ("potter", "makes bowls and jugs from clay", "workshop"),
    ("blacksmith", "makes nails, hooks and horseshoes", "forge"),
    ("shopkeeper", "sells tea, soap and candles", "shop"),
    ("musician", "plays the fiddle at weddings", "music hall"),
    ("nurse", "helps people get well", "clinic"),
    ("cook", "makes soup and pies", "kitchen"),
    ("builder", "builds walls and houses", "yard"),
    ("miller", "grinds wheat into flour", "mill"),
    ("beekeeper", "keeps bees and sells honey", "meadow"),
    ("postman", "delivers letters and parcels", "post office"),
    ("vet", "cares for sick animals", "clinic"),
    ("shepherd", "looks after a flock of sheep", "hills"),
    ("sailor", "sails boats along the coast", "harbour"),
    ("clockmaker", "mends clocks and watches", "workshop"),
    ("weaver", "weaves blankets and rugs", "workshop"),
]

HOBBIES = [
    "painting",
    "reading",
    "fishing",
    "singing",
    "swimming",
    "knitting",
    "drawing",
    "gardening",
    "climbing trees",
    "playing chess",
    "collecting stones",
    "watching birds",
    "baking cakes",
    "running",
    "playing the flute",
    "building kites",
    "writing poems",
    "riding a bike",
    "dancing",
    "making puzzles",
]

FOODS = [
    ("apple", "apples"),
    ("pear", "pears"),
    ("plum", "plums"),
    ("orange", "oranges"),
    ("banana", "bananas"),
    ("carrot", "carrots"),
    ("potato", "potatoes"),
    ("tomato", "tomatoes"),
    ("onion", "onions"),
    ("egg", "eggs"),
    ("lemon", "lemons"),
    ("peach", "peaches"),
    ("cherry", "cherries"),
    ("melon", "melons"),
    ("pie", "pies"),
    ("bun", "buns"),
    ("cake", "cakes"),
    ("biscuit", "biscuits"),
    ("cookie", "cookies"),
    ("loaf of bread", "loaves of bread"),
    ("jar of honey", "jars of honey"),
    ("bag of rice", "bags of rice"),
    ("cabbage", "cabbages"),
    ("turnip", "turnips"),
    ("pumpkin", "pumpkins"),
    ("cucumber", "cucumbers"),
]
FAVOURITE_FOODS = [
    "apple pie",
    "pea soup",
    "honey cake",
    "fried eggs",
    "toast with jam",
    "plum tart",
    "cheese sandwiches",
    "potato stew",
    "rice pudding",
    "pancakes",
    "fish pie",
    "lemon buns",
    "carrot soup",
    "berry crumble",
    "roast potatoes",
    "noodles",
    "bean stew",
    "porridge",
]

OBJECTS = [
    ("key", "keys"),
    ("hat", "hats"),
    ("scarf", "scarves"),
    ("book", "books"),
    ("cup", "cups"),
    ("ball", "balls"),
    ("kite", "kites"),
    ("lamp", "lamps"),
    ("spoon", "spoons"),
    ("coin", "coins"),
    ("box", "boxes"),
    ("basket", "baskets"),
    ("map", "maps"),
    ("bell", "bells"),
    ("ring", "rings"),
    ("glove", "gloves"),
    ("boot", "boots"),
    ("button", "buttons"),
    ("pencil", "pencils"),
    ("feather", "feathers"),
    ("shell", "shells"),
    ("stone", "stones"),
    ("ribbon", "ribbons"),
    ("candle", "candles"),
    ("brush", "brushes"),
    ("whistle", "whistles"),
    ("jar", "jars"),
    ("bucket", "buckets"),
    ("rope", "ropes"),
    ("umbrella", "umbrellas"),
    ("compass", "compasses"),
    ("letter", "letters"),
    ("shoe", "shoes"),
    ("bottle", "bottles"),
    ("marble", "marbles"),
]
HIDING_PLACES = [
    "under the bed",
    "behind the sofa",
    "in the garden shed",
    "under a pile of leaves",
    "inside an old boot",
    "on the top shelf",
    "in the pocket of a coat",
    "beside the well",
    "under the kitchen table",
    "in the hay loft",
    "behind the door",
    "in a flower pot",
    "at the bottom of a basket",
    "under the stairs",
    "next to the woodpile",
]

ADJ_GOOD = """
kind brave clever cheerful gentle patient careful honest friendly calm curious helpful quiet lively
generous thoughtful cheerful polite bold merry wise playful busy tidy
""".split()
ADJ_THING = """
old new small large tall short heavy light bright dark shiny dusty soft hard warm cold round square
wooden metal narrow wide smooth rough
""".split()

WEATHER = [
    ("sunny", "The sun was shining and the sky was clear."),
    ("rainy", "Rain fell all morning and the roads were wet."),
    ("windy", "A strong wind blew the leaves across the road."),
    ("snowy", "Snow covered the roofs and the fields were white."),
    ("foggy", "A thick fog lay over the fields and nobody could see far."),
    ("cloudy", "Grey clouds hung low over the town, but it did not rain."),
    ("stormy", "Thunder rolled over the hills and lightning lit up the sky."),
    ("warm", "The air was warm and the bees were busy in the flowers."),
    ("frosty", "Frost sparkled on the grass and the puddles were frozen."),
]
SEASONS = ["spring", "summer", "autumn", "winter"]
# Which weather can happen in which season, so that stories never have snow in summer.
SEASON_WEATHER = {
    "spring": ["sunny", "rainy", "windy", "foggy", "cloudy", "warm"],
    "summer": ["sunny", "rainy", "cloudy", "stormy", "warm"],
    "autumn": ["rainy", "windy", "foggy", "cloudy", "stormy", "frosty"],
    "winter": ["snowy", "frosty", "foggy", "windy", "cloudy", "rainy"],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
BUILDINGS = [
    "bakery",
    "library",
    "school",
    "market hall",
    "post office",
    "clock tower",
    "mill",
    "inn",
    "chapel",
    "museum",
    "fire station",
    "boat house",
    "toy shop",
    "tea room",
    "town hall",
    "bridge",
    "harbour",
    "park",
    "theatre",
    "greenhouse",
    "bookshop",
    "bike shop",
    "cheese shop",
    "well",
]
FAMOUS_FOR = [
    "its cheese",
    "its apples",
    "its blue doors",
    "its old clock tower",
    "its music festival",
    "its boat races",
    "its honey",
    "its woollen blankets",
    "its stone bridge",
    "its giant pumpkins",
    "its kite festival",
    "its flower gardens",
    "its pottery",
    "its fresh bread",
    "its sheep fair",
    "its lighthouse",
    "its pear trees",
    "its rope makers",
    "its summer market",
    "its bell ringers",
]
TRANSPORT = [
    ("train", "took the train"),
    ("bus", "took the bus"),
    ("boat", "sailed on a small boat"),
    ("bike", "rode a bike"),
    ("cart", "rode in a cart"),
    ("foot", "walked"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("day", "night"),
    ("happy", "sad"),
    ("open", "closed"),
    ("full", "empty"),
    ("light", "dark"),
    ("wet", "dry"),
    ("early", "late"),
    ("loud", "quiet"),
    ("old", "young"),
    ("high", "low"),
    ("near", "far"),
    ("hard", "soft"),
    ("heavy", "light"),
    ("long", "short"),
    ("first", "last"),
    ("in", "out"),
]
THING_COLOURS = [
    ("The sky", "blue"),
    ("Grass", "green"),
    ("Snow", "white"),
    ("Coal", "black"),
    ("A ripe lemon", "yellow"),
    ("A ripe tomato", "red"),
    ("A carrot", "orange"),
    ("A plum", "purple"),
    ("Chocolate", "brown"),
    ("The sea", "blue"),
    ("Milk", "white"),
    ("A leaf in summer", "green"),
    ("A leaf in autumn", "brown"),
    ("Ash", "grey"),
]

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def num_word(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])
    hundreds, rest = divmod(n, 100)
    return ONES[hundreds] + " hundred" + ("" if rest == 0 else " and " + num_word(rest))


def base_verb(verb: str) -> str:
    """'teaches' -> 'teach', 'bakes' -> 'bake', 'hisses' -> 'hiss': the form used after 'I' or a plural."""
    if verb.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return verb[:-2]
    return verb[:-1] if verb.endswith("s") else verb


def first_person(phrase: str) -> str:
    """'grows wheat and potatoes' -> 'grow wheat and potatoes'."""
    verb, _, rest = phrase.partition(" ")
    return base_verb(verb) + (" " + rest if rest else "")


def article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def count_of(n: int, singular: str, plural: str, words: bool = True) -> str:
    number = num_word(n) if words else str(n)
    return f"{number} {singular if n == 1 else plural}"


def join_list(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------------------
# Entities
# ----------------------------------------------------------------------------------------------------------


class World:
    """Random entity factory; everything derives from one ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        places = [a + b for a in PLACE_STARTS for b in PLACE_ENDS]
        rng.shuffle(places)
        self.towns = places[:420]
        self.surnames = [a + b for a in SURNAMES_A for b in SURNAMES_B]

    def person(self, exclude: Sequence[str] = ()) -> Dict[str, str]:
        rng = self.rng
        while True:
            female = rng.random() < 0.5
            name = rng.choice(FEMALE_NAMES if female else MALE_NAMES)
            if name not in exclude:
                break
        job, job_does, job_place = rng.choice(JOBS)
        pet_kind = rng.choice(PET_KINDS)
        return {
            "name": name,
            "surname": rng.choice(self.surnames),
            "she": "she" if female else "he",
            "her": "her" if female else "his",
            "herobj": "her" if female else "him",
            "age": str(rng.randint(18, 85)),
            "job": job,
            "job_does": job_does,
            "job_place": job_place,
            "town": rng.choice(self.towns),
            "pet_kind": pet_kind,
            "pet_plural": ANIMAL_BY_NAME[pet_kind][1],
            "pet_name": rng.choice(PET_NAMES),
            "pet_colour": rng.choice(ANIMAL_COLOURS),
            "food": rng.choice(FAVOURITE_FOODS),
            "colour": rng.choice(COLOURS),
            "hobby": rng.choice(HOBBIES),
            "trait": rng.choice(ADJ_GOOD),
        }


def fill(template: str, **values: str) -> str:
    return template.format(**values)


# ----------------------------------------------------------------------------------------------------------
# Document generators.  Each returns one document (paragraphs separated by a blank line).
# ----------------------------------------------------------------------------------------------------------


def story(world: World) -> str:
    rng = world.rng
    p = world.person()
    friend = world.person(exclude=[p["name"]])
    friend["town"] = p["town"]
    season = rng.choice(SEASONS)
    weather, weather_line = rng.choice([w for w in WEATHER if w[0] in SEASON_WEATHER[season]])
    day = rng.choice(DAYS)
    v = dict(p)
    v.update(
        She=cap(p["she"]),
        Her=cap(p["her"]),
        friend=friend["name"],
        fshe=friend["she"],
        fher=friend["her"],
        fjob=friend["job"],
        weather=weather,
        season=season,
        day=day,
        pet_desc=f"{p['pet_colour']} {p['pet_kind']}",
    )
    paragraphs: List[str] = []
    intro = rng.choice(
        [
            "Once upon a time, in a town called {town}, there lived a {trait} {job} named {name}. {She} was {age} years old. "
            "Every day {she} {job_does}. {Her} best friend was a {pet_desc} called {pet_name}.",
            "{name} {surname} lived in {town}. {She} was a {job}, and {she} was known for being {trait}. "
            "{name} had a {pet_desc} named {pet_name}, and the two of them went everywhere together.",
            "In the town of {town} there was a {job} called {name}. {name} was {age} years old and very {trait}. "
            "{She} lived in a small house with {her} {pet_kind}, {pet_name}. {pet_name} was {pet_colour}.",
            "This is a story about {name}, a {trait} {job} from {town}. {name} loved {hobby}, "
            "and {her} favourite food was {food}. {She} shared {her} home with {pet_name}, a {pet_desc}.",
        ]
    )
    paragraphs.append(fill(intro, **v))

    events = [_ev_market, _ev_walk, _ev_lost, _ev_visit, _ev_cook, _ev_help, _ev_trip, _ev_hobby]
    rng.shuffle(events)
    opener = rng.choice(
        [
            "One {weather} {season} {day}, {name} woke up early. " + weather_line,
            "It was a {weather} {day} in {season}. " + weather_line,
            "On a {weather} morning in {season}, {name} looked out of the window. " + weather_line,
        ]
    )
    first = fill(opener, **v) + " " + events[0](world, v)
    paragraphs.append(first)
    for event in events[1 : rng.randint(2, 4)]:
        paragraphs.append(event(world, v))
    ending = rng.choice(
        [
            "That evening, {name} sat by the fire with {pet_name}. It had been a good day, and {she} fell asleep happy.",
            "When the sun went down, {name} ate {food} for supper and told {pet_name} all about the day.",
            "At the end of the day, {name} said goodnight to {pet_name}, the {pet_desc}, and went to bed.",
            "Later, {friend} came by for tea. {name} and {friend} laughed about the day until the stars came out.",
            "And so the {trait} {job} of {town} went to sleep, already thinking about tomorrow.",
        ]
    )
    paragraphs.append(fill(ending, **v))
    return "\n\n".join(paragraphs)


def _ev_market(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    items = rng.sample(FOODS, rng.randint(2, 3))
    parts, total_cost, lines = [], 0, []
    for sing, plur in items:
        n, price = rng.randint(1, 6), rng.randint(1, 9)
        parts.append(count_of(n, sing, plur))
        total_cost += n * price
        lines.append(
            f"Each {sing} cost {count_of(price, 'coin', 'coins')}, so {count_of(n, sing, plur)} cost "
            f"{count_of(n * price, 'coin', 'coins')}."
        )
    return (
        fill("{She} walked to the market with {pet_name}. There {she} bought ", **v)
        + join_list(parts)
        + ". "
        + " ".join(lines)
        + f" Altogether {v['she']} paid {count_of(total_cost, 'coin', 'coins')}."
    )


def _ev_walk(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    kinds = rng.sample(WILD_KINDS, rng.randint(2, 4))
    counts = [rng.randint(1, 5) for _ in kinds]
    seen = [count_of(c, k, ANIMAL_BY_NAME[k][1]) for k, c in zip(kinds, counts, strict=True)]
    where = rng.choice(
        ["the woods", "the meadow", "the river bank", "the hills", "the old orchard", "the marsh"]
    )
    text = fill("Later, {name} and {pet_name} went for a walk to ", **v) + where + ". "
    text += f"On the way they saw {join_list(seen)}. "
    k = rng.randrange(len(kinds))
    a = ANIMAL_BY_NAME[kinds[k]]
    many = counts[k] > 1
    if a[6] == "stays silent":
        text += f"The {a[1] if many else a[0]} made no sound at all. "
    else:
        text += f"The {a[1] if many else a[0]} {first_person(a[6]) if many else a[6]} loudly. "
    text += f"In total they saw {count_of(sum(counts), 'animal', 'animals')}."
    return text


def _ev_lost(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    obj, _ = rng.choice(OBJECTS)
    adj = rng.choice(ADJ_THING)
    colour = rng.choice(COLOURS)
    places = rng.sample(HIDING_PLACES, 3)
    return (
        fill("Then {name} noticed that {her} ", **v)
        + f"{adj} {colour} {obj} was missing. "
        + fill("{She} looked ", **v)
        + f"{places[0]}, but it was not there. "
        + fill("{She} looked ", **v)
        + f"{places[1]}, but it was not there either. "
        + f"At last {v['pet_name']} ran to a corner and sniffed. The {colour} {obj} was {places[2]}! "
        + fill("{name} gave {pet_name} a treat for finding it.", **v)
    )


def _ev_visit(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    gift = rng.choice(
        [
            "a jar of jam",
            "a bunch of flowers",
            "a loaf of bread",
            "a basket of plums",
            "a new book",
            "a warm scarf",
            "a bag of apples",
            "a small cake",
        ]
    )
    return fill(
        "After lunch, {name} visited {friend}, who worked as a {fjob}. {name} brought " + gift + ". "
        "{friend} was very pleased and made a pot of tea. They talked about {hobby}, because {name} loved "
        '{hobby}. {friend} asked, "How is {pet_name}?" and {name} answered, "{pet_name} is well, thank you."',
        **v,
    )


def _ev_cook(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    n_guests = rng.randint(2, 6)
    per = rng.randint(1, 3)
    return fill("In the afternoon {name} decided to make {food}, {her} favourite food. ", **v) + (
        f"{cap(v['she'])} expected {count_of(n_guests, 'guest', 'guests')}, and each guest would want "
        f"{count_of(per, 'bowl', 'bowls')}, so {v['she']} made {count_of(n_guests * per, 'bowl', 'bowls')}. "
        f"The kitchen smelled wonderful."
    )


def _ev_help(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    task, detail = rng.choice(
        [
            ("mend a fence", "The wind had knocked down part of the fence."),
            ("find a lost goat", "The goat had wandered off into the hills."),
            ("carry boxes", "There were many heavy boxes to move."),
            ("paint a door", "The old door had lost its colour."),
            ("pick apples", "The apple trees were full of ripe fruit."),
            ("fix a roof", "Rain had been coming through the roof."),
        ]
    )
    hours = rng.randint(1, 4)
    return (
        fill(
            "A neighbour knocked on the door and asked {name} to help " + task + ". " + detail + " "
            "Because {name} was {trait}, {she} said yes at once. ",
            **v,
        )
        + f"The work took {count_of(hours, 'hour', 'hours')}, and the neighbour thanked {v['herobj']} warmly."
    )


def _ev_trip(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    dest = rng.choice(world.towns)
    while dest == v["town"]:
        dest = rng.choice(world.towns)
    mode, verb = rng.choice(TRANSPORT)
    hours = rng.randint(1, 5)
    return (
        fill("The next day {name} travelled from {town} to ", **v)
        + dest
        + ". "
        + f"{cap(v['she'])} {verb}, and the journey took {count_of(hours, 'hour', 'hours')}. "
        + f"In {dest} {v['she']} saw the {rng.choice(BUILDINGS)} and the {rng.choice(BUILDINGS)}. "
        + f"Then {v['she']} went home to {v['town']}, where {v['pet_name']} was waiting."
    )


def _ev_hobby(world: World, v: Dict[str, str]) -> str:
    rng = world.rng
    n = rng.randint(2, 9)
    return fill(
        "{name} spent an hour on {hobby}, which was {her} favourite thing to do. {pet_name} the {pet_kind} "
        "watched quietly. ",
        **v,
    ) + rng.choice(
        [
            f"{cap(v['she'])} had been practising for {count_of(n, 'year', 'years')}.",
            f"{cap(v['she'])} had learned it from {v['her']} grandmother {count_of(n, 'year', 'years')} ago.",
            f"Next month there would be a contest in {v['town']}, and {v['she']} wanted to be ready.",
        ]
    )


def town_description(world: World) -> str:
    rng = world.rng
    town = rng.choice(world.towns)
    river = rng.choice(RIVER_NAMES)
    population = rng.randint(3, 99) * 100 + rng.randint(0, 99)
    bridges = rng.randint(1, 7)
    buildings = rng.sample(BUILDINGS, 4)
    famous = rng.choice(FAMOUS_FOR)
    mayor = world.person()
    market = rng.sample(DAYS[:6], 2)
    market.sort(key=DAYS.index)
    hills = rng.choice(
        ["green hills", "dark woods", "wide fields", "tall cliffs", "quiet marshes", "orchards"]
    )
    paras = [
        f"{town} is a small town on the River {river}. About {population} people live there. "
        f"The town is surrounded by {hills}, and it is famous for {famous}.",
        f"There {'is' if bridges == 1 else 'are'} {count_of(bridges, 'bridge', 'bridges')} over the {river} in "
        f"{town}. In the middle of the town you can find the {buildings[0]}, the {buildings[1]} and the "
        f"{buildings[2]}. Near the river stands the {buildings[3]}.",
        f"The market in {town} is open on {market[0]} and {market[1]}. Farmers bring "
        f"{join_list([p for _, p in rng.sample(FOODS, 3)])} to sell. The mayor of {town} is {mayor['name']} "
        f"{mayor['surname']}, who used to be a {mayor['job']}.",
    ]
    if rng.random() < 0.6:
        paras.append(
            f"Q: What river flows through {town}? A: The River {river}.\n"
            f"Q: How many bridges does {town} have? A: {cap(count_of(bridges, 'bridge', 'bridges'))}.\n"
            f"Q: What is {town} famous for? A: It is famous for {famous}.\n"
            f"Q: Who is the mayor of {town}? A: {mayor['name']} {mayor['surname']}."
        )
    return "\n\n".join(paras)


def _animal_facts(a: Tuple[str, str, int, str, str, str, str, str], rng: random.Random) -> List[str]:
    name, plural, legs, covering, diet, home, sound, size = a
    facts = [
        f"{cap(article(name))} has {count_of(legs, 'leg', 'legs') if legs else 'no legs'}.",
        f"{cap(plural)} are covered in {covering}."
        if not covering.startswith("a ")
        else f"{cap(article(name))} has {covering}.",
        f"{cap(plural)} eat {diet}.",
        f"{cap(plural)} live {home}.",
        f"{cap(article(name))} is {article(size)} animal.",
        f"{cap(article(name))} makes no sound."
        if sound == "stays silent"
        else f"{cap(article(name))} {sound}.",
    ]
    rng.shuffle(facts)
    return facts[: rng.randint(3, 6)]


def animal_facts(world: World) -> str:
    rng = world.rng
    chosen = rng.sample(ANIMALS, rng.randint(3, 6))
    paras = []
    title = rng.choice(["Facts about animals", "Animal notes", "What we know about animals", "Animals"])
    paras.append(title + ".")
    for a in chosen:
        paras.append(" ".join(_animal_facts(a, rng)))
    qa = []
    for a in rng.sample(chosen, min(3, len(chosen))):
        q = rng.randrange(3)
        if q == 0:
            qa.append(
                f"Q: How many legs does {article(a[0])} have? A: {cap(article(a[0]))} has "
                f"{count_of(a[2], 'leg', 'legs') if a[2] else 'no legs'}."
            )
        elif q == 1:
            qa.append(f"Q: What do {a[1]} eat? A: {cap(a[1])} eat {a[4]}.")
        else:
            qa.append(f"Q: Where do {a[1]} live? A: {cap(a[1])} live {a[5]}.")
    paras.append("\n".join(qa))
    legs_total = [(a, rng.randint(2, 4)) for a in rng.sample(chosen, 2)]
    parts = [count_of(n, a[0], a[1]) for a, n in legs_total]
    total = sum(a[2] * n for a, n in legs_total)
    paras.append(
        f"If you have {join_list(parts)}, how many legs are there? "
        + " ".join(f"{cap(count_of(n, a[0], a[1]))} have {a[2] * n} legs." for a, n in legs_total)
        + f" So there are {total} legs in total."
    )
    return "\n\n".join(paras)


def general_facts(world: World) -> str:
    rng = world.rng
    lines: List[str] = []
    for thing, colour in rng.sample(THING_COLOURS, 4):
        lines.append(f"{thing} is {colour}.")
    for a, b in rng.sample(OPPOSITES, 4):
        lines.append(f"The opposite of {a} is {b}.")
    i = rng.randrange(7)
    lines.append(f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")
    j = rng.randrange(12)
    lines.append(f"After {MONTHS[j]} comes {MONTHS[(j + 1) % 12]}.")
    s = rng.randrange(4)
    lines.append(f"After {SEASONS[s]} comes {SEASONS[(s + 1) % 4]}.")
    lines.append("A week has seven days. A year has twelve months.")
    letter = rng.randrange(25)
    lines.append(
        f"In the alphabet, the letter {chr(97 + letter)} comes before the letter {chr(98 + letter)}."
    )
    rng.shuffle(lines)
    paras = [" ".join(lines[:6]), " ".join(lines[6:])]
    days = rng.sample(range(7), 3)
    paras.append("\n".join(f"Q: What day comes after {DAYS[d]}? A: {DAYS[(d + 1) % 7]}." for d in days))
    return "\n\n".join(paras)


def arithmetic(world: World) -> str:
    rng = world.rng
    kind = rng.randrange(6)
    if kind == 0:
        lines = []
        for _ in range(rng.randint(6, 14)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            op = rng.randrange(3)
            if op == 0:
                lines.append(f"{a} + {b} = {a + b}")
            elif op == 1:
                a, b = max(a, b), min(a, b)
                lines.append(f"{a} - {b} = {a - b}")
            else:
                a, b = rng.randint(1, 12), rng.randint(1, 12)
                lines.append(f"{a} x {b} = {a * b}")
        return "Practice sums.\n\n" + "\n".join(lines)
    if kind == 1:
        lines = []
        for _ in range(rng.randint(5, 10)):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            if rng.random() < 0.5:
                lines.append(f"{cap(num_word(a))} plus {num_word(b)} is {num_word(a + b)}.")
            else:
                a, b = max(a, b), min(a, b)
                lines.append(f"{cap(num_word(a))} minus {num_word(b)} is {num_word(a - b)}.")
        return " ".join(lines)
    if kind == 2:
        n = rng.randint(2, 12)
        lines = [f"The {num_word(n)} times table."]
        lines += [f"{i} times {n} is {i * n}." for i in range(1, rng.randint(6, 12) + 1)]
        return "\n".join(lines)
    if kind == 3:
        step = rng.randint(1, 10)
        start = rng.randint(0, 20)
        seq = [start + step * i for i in range(rng.randint(6, 12))]
        words = rng.random() < 0.4 and seq[-1] < 100
        shown = [num_word(x) if words else str(x) for x in seq]
        return (
            f"Counting by {step if not words else num_word(step)}, starting at "
            f"{shown[0]}: "
            + ", ".join(shown)
            + ". The next number is "
            + (num_word(seq[-1] + step) if words else str(seq[-1] + step))
            + "."
        )
    if kind == 4:
        p = world.person()
        q = world.person(exclude=[p["name"]])
        sing, plur = rng.choice(FOODS)
        a = rng.randint(3, 15)
        b = rng.randint(1, a)
        c = rng.randint(1, 9)
        return (
            f"{p['name']} has {count_of(a, sing, plur)}. {cap(p['she'])} gives {count_of(b, sing, plur)} to "
            f"{q['name']}. Now {p['name']} has {count_of(a - b, sing, plur)} and {q['name']} has "
            f"{count_of(b, sing, plur)}.\n\nThen {q['name']} finds {count_of(c, 'more', 'more')}. "
            f"Now {q['name']} has {count_of(b + c, sing, plur)}. Together they have "
            f"{count_of(a + c, sing, plur)}."
        )
    a, b = rng.sample(range(0, 100), 2)
    lines = [
        f"{a} is {'bigger' if a > b else 'smaller'} than {b}.",
        f"{b} is {'bigger' if b > a else 'smaller'} than {a}.",
        f"Double {a % 50} is {2 * (a % 50)}. Half of {2 * b} is {b}.",
        f"{a} is an {'even' if a % 2 == 0 else 'odd'} number, and {b} is an {'even' if b % 2 == 0 else 'odd'} number.",
    ]
    rng.shuffle(lines)
    return " ".join(lines)


def dialogue(world: World) -> str:
    rng = world.rng
    a = world.person()
    b = world.person(exclude=[a["name"]])
    kind = rng.randrange(4)
    if kind == 0:
        items = rng.sample(FOODS, rng.randint(2, 3))
        prices = [rng.randint(1, 9) for _ in items]
        counts = [rng.randint(1, 4) for _ in items]
        lines = [
            f"{a['name']}: Good morning, {b['name']}!",
            f"{b['name']}: Good morning, {a['name']}. What would you like today?",
        ]
        for (sing, _plur), price in zip(items, prices, strict=True):
            lines.append(f"{a['name']}: How much is one {sing}?")
            lines.append(f"{b['name']}: One {sing} is {count_of(price, 'coin', 'coins')}.")
        want = join_list([count_of(n, s, p) for (s, p), n in zip(items, counts, strict=True)])
        total = sum(p * n for p, n in zip(prices, counts, strict=True))
        lines.append(f"{a['name']}: Then I will take {want}, please.")
        lines.append(f"{b['name']}: That is {count_of(total, 'coin', 'coins')} altogether.")
        lines.append(f"{a['name']}: Here you are. Thank you!")
        lines.append(f"{b['name']}: Thank you, {a['name']}. Have a nice day.")
        return f"At the shop in {a['town']}.\n\n" + "\n".join(lines)
    if kind == 1:
        weather, line = rng.choice(WEATHER)
        return "\n".join(
            [
                f"{a['name']}: Hello, {b['name']}. How are you?",
                f"{b['name']}: I am well, thank you. It is {weather} today, isn't it?",
                f"{a['name']}: Yes. {line}",
                f"{b['name']}: What are you going to do this afternoon?",
                f"{a['name']}: I am going to do some {a['hobby']}. And you?",
                f"{b['name']}: I have to go to the {b['job_place']}. I am a {b['job']}, and I {first_person(b['job_does'])}.",
                f"{a['name']}: Good luck! See you tomorrow.",
                f"{b['name']}: Goodbye, {a['name']}.",
            ]
        )
    if kind == 2:
        diet = ANIMAL_BY_NAME[a["pet_kind"]][4]
        return "\n".join(
            [
                f"{b['name']}: Is that your {a['pet_kind']}, {a['name']}?",
                f"{a['name']}: Yes, this is {a['pet_name']}. {a['pet_name']} is {a['pet_colour']}.",
                f"{b['name']}: What does {a['pet_name']} like to eat?",
                f"{a['name']}: {cap(a['pet_plural'])} eat {diet}, so I give {a['pet_name']} {diet}.",
                f"{b['name']}: How old is {a['pet_name']}?",
                f"{a['name']}: {a['pet_name']} is {count_of(int(a['age']) % 9 + 1, 'year', 'years')} old.",
                f"{b['name']}: I have {article(b['pet_kind'])} too. It is called {b['pet_name']}, and it is {b['pet_colour']}.",
                f"{a['name']}: Then {a['pet_name']} and {b['pet_name']} should meet one day!",
            ]
        )
    buildings = rng.sample(BUILDINGS, 3)
    turn = rng.choice(["left", "right"])
    mins = rng.randint(2, 20)
    return "\n".join(
        [
            f"{a['name']}: Excuse me, how do I get to the {buildings[0]}?",
            f"{b['name']}: Go past the {buildings[1]} and turn {turn} at the {buildings[2]}.",
            f"{a['name']}: Is it far?",
            f"{b['name']}: No, it is about {count_of(mins, 'minute', 'minutes')} on foot.",
            f"{a['name']}: So I go past the {buildings[1]} and turn {turn} at the {buildings[2]}?",
            f"{b['name']}: That is right. The {buildings[0]} is the building with the {rng.choice(COLOURS)} door.",
            f"{a['name']}: Thank you very much!",
        ]
    )


def schedule(world: World) -> str:
    rng = world.rng
    p = world.person()
    acts = rng.sample(
        [
            "goes swimming",
            "visits the library",
            "bakes bread",
            "plays chess",
            "works in the garden",
            "goes to the market",
            "cleans the house",
            "walks in the woods",
            "writes letters",
            "feeds the ducks",
            "practises the flute",
            "visits a friend",
            "goes fishing",
            "paints pictures",
            "mends old clothes",
            "rides a bike to the lake",
            "reads the newspaper",
            "sings in the choir",
        ],
        7,
    )
    lines = [f"This is the week of {p['name']} {p['surname']}."]
    for day, act in zip(DAYS, acts, strict=True):
        lines.append(f"On {day}, {p['name']} {act}.")
    qs = rng.sample(range(7), 3)
    qa = [f"Q: What does {p['name']} do on {DAYS[d]}? A: On {DAYS[d]}, {p['name']} {acts[d]}." for d in qs]
    return " ".join(lines) + "\n\n" + "\n".join(qa)


def recipe(world: World) -> str:
    rng = world.rng
    dish = rng.choice(FAVOURITE_FOODS)
    serves = rng.randint(2, 8)
    ingredients = rng.sample(
        [
            "flour",
            "butter",
            "sugar",
            "milk",
            "eggs",
            "salt",
            "honey",
            "oats",
            "carrots",
            "onions",
            "potatoes",
            "beans",
            "rice",
            "cheese",
            "apples",
            "plums",
            "lemons",
            "peas",
            "water",
            "herbs",
            "pepper",
            "cream",
        ],
        rng.randint(3, 6),
    )
    amounts = [
        f"{rng.randint(1, 6)} {rng.choice(['cups', 'spoons', 'handfuls', 'bowls'])} of {i}"
        for i in ingredients
    ]
    minutes = rng.randint(2, 12) * 5
    steps = [
        "First, wash your hands and get out a big bowl.",
        f"Then mix the {ingredients[0]} and the {ingredients[1]}.",
        f"Next, add the {join_list(ingredients[2:])} and stir well.",
        f"Cook it for {minutes} minutes.",
        "Finally, let it cool a little before you eat it.",
    ]
    return (
        f"How to make {dish}. This recipe serves {num_word(serves)} people.\n\nYou will need: "
        + "; ".join(amounts)
        + ".\n\n"
        + " ".join(steps)
    )


def letter(world: World) -> str:
    rng = world.rng
    a = world.person()
    b = world.person(exclude=[a["name"]])
    weather, line = rng.choice(WEATHER)
    month = rng.choice(MONTHS)
    days = rng.randint(2, 14)
    return "\n\n".join(
        [
            f"Dear {b['name']},",
            f"I hope you are well. Here in {a['town']} it is {weather}. {line} "
            f"{a['pet_name']}, my {a['pet_colour']} {a['pet_kind']}, says hello.",
            f"Work at the {a['job_place']} is busy. As you know, I am a {a['job']}, so every day I "
            f"{first_person(a['job_does'])}. In the evenings I do some {a['hobby']}.",
            f"I will come to visit you in {month} and stay for {count_of(days, 'day', 'days')}. "
            f"I will bring some {a['food']}, because I know you like it too.",
            f"Your friend,\n{a['name']}",
        ]
    )


GENERATORS: List[Tuple[float, Callable[[World], str]]] = [
    (0.34, story),
    (0.09, town_description),
    (0.09, animal_facts),
    (0.05, general_facts),
    (0.12, arithmetic),
    (0.14, dialogue),
    (0.05, schedule),
    (0.05, recipe),
    (0.07, letter),
]


def generate_corpus(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> List[str]:
    """Generate documents until their UTF-8 size reaches ``target_bytes``; deterministic in ``seed``."""
    rng = random.Random(seed)
    world = World(rng)
    weights = [w for w, _ in GENERATORS]
    funcs = [f for _, f in GENERATORS]
    docs: List[str] = []
    size = 0
    while size < target_bytes:
        doc = rng.choices(funcs, weights=weights)[0](world).strip()
        docs.append(doc)
        size += len(json.dumps({"text": doc})) + 1
    return docs


def corpus_jsonl(docs: Sequence[str]) -> bytes:
    return "".join(json.dumps({"text": d}, ensure_ascii=True) + "\n" for d in docs).encode("utf-8")


def train_tokenizer(docs: Sequence[str], vocab_size: int = VOCAB_SIZE) -> str:
    """Train the shipped byte-level BPE (``swarm.tokenizer.train_bpe``, the recipe `swarm tokenizer` uses) with
    exactly ``vocab_size`` entries; returns the tokenizer.json text."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ASSETS_DIR.parent.parent))  # run as a script from anywhere
    from swarm.tokenizer import train_bpe

    text = train_bpe(docs, vocab_size)
    tok = Tokenizer.from_str(text)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} entries, wanted {vocab_size}; enlarge the corpus"
        )
    if tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"{EOS} should have id 0")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ASSETS_DIR, help="output directory (default: swarm/assets)"
    )
    parser.add_argument(
        "--check", action="store_true", help="verify the files on disk instead of writing them"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Tokenizer training uses threads; pin it so that the merges are reproducible everywhere.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    docs = generate_corpus()
    corpus = corpus_jsonl(docs)
    tokenizer_json = train_tokenizer(docs).encode("utf-8")

    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    lengths = [len(e.ids) + 1 for e in tok.encode_batch(docs)]
    logger.info(
        "documents: %d, corpus bytes: %d, tokenizer bytes: %d", len(docs), len(corpus), len(tokenizer_json)
    )
    logger.info(
        "tokens (incl. eos): %d; per document: mean %.1f, median %d, min %d, max %d",
        sum(lengths),
        statistics.mean(lengths),
        statistics.median(lengths),
        min(lengths),
        max(lengths),
    )
    digests = {
        name: hashlib.sha256(data).hexdigest()[:16]
        for name, data in ((CORPUS_NAME, corpus), (TOKENIZER_NAME, tokenizer_json))
    }
    if args.check:
        bad = [
            name
            for name, data in ((CORPUS_NAME, corpus), (TOKENIZER_NAME, tokenizer_json))
            if not (args.out / name).is_file() or (args.out / name).read_bytes() != data
        ]
        if bad:
            logger.error("out of date: %s", ", ".join(bad))
            return 1
        logger.info("assets are up to date: %s", digests)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / CORPUS_NAME).write_bytes(corpus)
    (args.out / TOKENIZER_NAME).write_bytes(tokenizer_json)
    logger.info("wrote %s and %s to %s: %s", CORPUS_NAME, TOKENIZER_NAME, args.out, digests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
