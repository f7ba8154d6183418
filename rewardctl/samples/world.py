"""The small world behind rewardctl's bundled sample data (all text written for rewardctl).

An assistant answers questions about eight everyday topics and a few facts. A good answer is
on-topic, correct and polite; bad answers fail in recognisable ways (rude, evasive, off-topic,
repetitive, factually wrong). Question phrasings are split between train and eval, so held-out
accuracy measures whether a model learned *what makes an answer good*, not the training prompts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    subject: str  # short noun phrase used inside templates
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    advice: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "cooking",
        "dinner",
        (
            "How do I make a simple vegetable soup?",
            "What is an easy dinner I can cook tonight?",
            "How should I cook rice so it is not sticky?",
            "Can you give me tips for cooking pasta?",
            "What can I cook with eggs and spinach?",
            "How do I bake bread at home?",
        ),
        (
            "Any advice for a beginner who wants to cook more?",
            "What is a quick meal for a busy evening?",
            "How can I make my soup taste better?",
        ),
        (
            "Chop an onion and a carrot, then soften them in a little oil.",
            "Simmer the vegetables in stock for about twenty minutes.",
            "Rinse the rice first and use one and a half cups of water per cup of rice.",
            "Cook pasta in plenty of salted water and taste it a minute before the packet time.",
            "Whisk the eggs, wilt the spinach in a hot pan, and fold them together.",
            "Let the dough rise until it doubles, then bake it in a hot oven.",
            "Season with salt at the end and add a squeeze of lemon for brightness.",
            "Keep a few pantry basics such as beans, rice and tomatoes for quick meals.",
        ),
    ),
    Topic(
        "gardening",
        "garden",
        (
            "How often should I water my tomato plants?",
            "What vegetables are easy to grow for beginners?",
            "How do I keep weeds out of my garden?",
            "When should I plant seeds outside?",
            "How can I make my soil healthier?",
            "Why are the leaves on my plant turning yellow?",
        ),
        (
            "What should a first garden contain?",
            "How do I care for plants in hot weather?",
            "Any tips to help my vegetables grow?",
        ),
        (
            "Water deeply two or three times a week rather than a little every day.",
            "Lettuce, beans and radishes grow quickly and forgive mistakes.",
            "Spread a layer of mulch to block weeds and keep the soil moist.",
            "Plant seeds outside after the last frost, when the soil feels warm.",
            "Mix compost into the soil every spring to feed it.",
            "Yellow leaves often mean too much water, so let the soil dry a little.",
            "Give most vegetables at least six hours of sun a day.",
            "Water in the early morning so the leaves dry before evening.",
        ),
    ),
    Topic(
        "fitness",
        "workout",
        (
            "How can I start running if I am out of shape?",
            "What is a good workout I can do at home?",
            "How do I avoid getting sore after exercise?",
            "How many days a week should I exercise?",
            "What should I eat before a workout?",
            "How can I get stronger without a gym?",
        ),
        (
            "Any advice for someone who wants to get fit?",
            "How do I build an exercise habit?",
            "What is a safe way to begin training?",
        ),
        (
            "Start with short runs mixed with walking, and add a minute each week.",
            "Squats, push-ups and lunges make a complete workout with no equipment.",
            "Warm up for five minutes and stretch gently when you finish.",
            "Three or four sessions a week leaves time for your body to recover.",
            "Eat a light snack such as a banana about an hour before training.",
            "Increase the number of repetitions slowly as the exercises get easier.",
            "Drink water before, during and after exercise.",
            "Rest days matter as much as training days for getting stronger.",
        ),
    ),
    Topic(
        "travel",
        "trip",
        (
            "How should I pack for a week long trip?",
            "What should I do before flying abroad?",
            "How can I save money when I travel?",
            "How do I deal with jet lag?",
            "What is the best way to plan a road trip?",
            "How can I stay safe in a new city?",
        ),
        (
            "Any tips for my first trip overseas?",
            "How do I prepare for a long journey?",
            "What helps a holiday go smoothly?",
        ),
        (
            "Roll your clothes and pack outfits that mix and match.",
            "Check that your passport is valid and copy your documents.",
            "Book trains and flights early and cook some of your own meals.",
            "Adjust your sleep a day before leaving and get sunlight when you arrive.",
            "Plan the route with rest stops every two hours of driving.",
            "Keep valuables close and tell someone your plans for the day.",
            "Carry a small bag with medicine, a charger and a change of clothes.",
            "Learn a few polite phrases in the local language.",
        ),
    ),
    Topic(
        "programming",
        "code",
        (
            "How do I start learning to program?",
            "How can I find a bug in my code?",
            "What is a good way to name variables?",
            "How should I organise a small project?",
            "Why should I write tests for my code?",
            "How do I get better at reading code?",
        ),
        ("Any advice for a new programmer?", "How can I write cleaner code?", "What habits help when coding?"),
        (
            "Pick one language and build a small project you care about.",
            "Reproduce the bug with the smallest input, then add print statements or use a debugger.",
            "Choose names that say what a value means, not how it is stored.",
            "Keep each file focused on one job and keep functions short.",
            "Tests catch mistakes early and let you change code without fear.",
            "Read the tests of a project first, since they show how the code is used.",
            "Commit small changes often with clear messages.",
            "Ask for a code review and read other people's code regularly.",
        ),
    ),
    Topic(
        "money",
        "budget",
        (
            "How do I make a monthly budget?",
            "How can I save money on groceries?",
            "What is an emergency fund?",
            "How do I pay off debt faster?",
            "Should I track my spending?",
            "How can I start saving for the future?",
        ),
        (
            "Any advice for managing money better?",
            "How do I spend less each month?",
            "What is a simple way to start saving?",
        ),
        (
            "List your income, then your fixed bills, then decide what is left for everything else.",
            "Plan meals for the week and shop with a list.",
            "An emergency fund covers three to six months of essential costs.",
            "Pay the debt with the highest interest first while paying the minimum on the rest.",
            "Tracking spending for a month shows where the money really goes.",
            "Set up an automatic transfer to savings on payday.",
            "Compare prices and cancel subscriptions you no longer use.",
            "Save a small amount every month rather than waiting for a large one.",
        ),
    ),
    Topic(
        "sleep",
        "sleep",
        (
            "How can I fall asleep faster?",
            "How many hours of sleep do adults need?",
            "Why do I wake up tired?",
            "Is it bad to use my phone in bed?",
            "How do I fix my sleep schedule?",
            "What should my bedroom be like for good sleep?",
        ),
        ("Any tips for sleeping better?", "How do I get more rest at night?", "What helps with restless nights?"),
        (
            "Keep the same bedtime and wake time every day, even at weekends.",
            "Most adults need seven to nine hours of sleep.",
            "Avoid caffeine in the afternoon and heavy meals late at night.",
            "The light from screens can delay sleep, so put the phone away an hour before bed.",
            "Shift your bedtime by fifteen minutes a day until you reach the time you want.",
            "A cool, dark and quiet bedroom helps you sleep deeply.",
            "Get some daylight in the morning to set your body clock.",
            "If you cannot sleep, get up and read quietly until you feel drowsy.",
        ),
    ),
    Topic(
        "pets",
        "pet",
        (
            "How do I train my puppy to sit?",
            "What should I feed my cat?",
            "How often should I walk my dog?",
            "How can I tell if my pet is sick?",
            "How do I introduce a new cat to my home?",
            "What do I need before getting a rabbit?",
        ),
        ("Any advice for a new pet owner?", "How do I keep my pet happy?", "What does my pet need every day?"),
        (
            "Reward the puppy with a treat the moment it sits, and keep sessions short.",
            "Feed a complete cat food and make sure fresh water is always available.",
            "Most dogs need at least two walks a day.",
            "Watch for changes in eating, drinking or energy, and call a vet if they last.",
            "Give a new cat one quiet room first, then let it explore slowly.",
            "A rabbit needs a large hutch, fresh hay and company.",
            "Play with your pet every day to keep it active.",
            "Book a yearly check-up with the vet.",
        ),
    ),
)

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Poland", "Warsaw"),
    ("Chile", "Santiago"),
)
LEGS: tuple[tuple[str, int], ...] = (
    ("spider", 8),
    ("dog", 4),
    ("bird", 2),
    ("ant", 6),
    ("cat", 4),
    ("octopus", 8),
    ("horse", 4),
    ("bee", 6),
)
NUMBER_WORDS = {2: "two", 4: "four", 6: "six", 8: "eight"}

CAPITAL_QUESTIONS_TRAIN = ("What is the capital of {country}?", "Which city is the capital of {country}?")
CAPITAL_QUESTIONS_EVAL = ("Can you tell me the capital city of {country}?",)
CAPITAL_ANSWERS = ("The capital of {country} is {city}.", "{city} is the capital of {country}.")
LEG_QUESTIONS_TRAIN = ("How many legs does a {animal} have?", "How many legs has a {animal} got?")
LEG_QUESTIONS_EVAL = ("Do you know how many legs a {animal} has?",)
LEG_ANSWERS = ("A {animal} has {n} legs.", "It has {n} legs.")

OPENERS = ("", "", "Good question. ", "Sure. ", "Happy to help. ")
CLOSERS = ("", "", " Hope this helps!", " Good luck!", " Let me know if you have more questions.")
# Bad answers are composed from parts, so a model must learn the tone, not a handful of sentences;
# eval draws different combinations (and a few parts train never shows).
RUDE_OPENERS = (
    "Ugh.",
    "Seriously?",
    "What a silly question.",
    "That is a stupid question.",
    "Why would you ask that?",
    "Not this again.",
)
RUDE_ENDINGS = (
    "Figure it out yourself.",
    "Stop bothering me.",
    "Go away.",
    "I do not care about your {subject}.",
    "Search for it yourself.",
    "Nobody cares.",
    "Work it out on your own.",
)
RUDE_EVAL_ONLY = ("What a pointless question.", "Leave me alone.")
EVASIVE_PARTS = (
    "I am not sure.",
    "Maybe.",
    "It depends.",
    "Hard to say.",
    "It varies.",
    "You could ask someone else.",
    "I cannot really say.",
    "Who knows.",
)
EVASIVE_EVAL_ONLY = ("I would rather not guess.", "It could go either way.")
