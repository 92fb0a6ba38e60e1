"""Demo data written by the project: support-chat summaries (DialogSum-like), ticket intents and tool calls.

    hotpeft demo-data --out demo/

Everything comes from templates with varied slots and a fixed seed, so the files are the same on
every machine and the train / held-out split never changes:

    support-summaries.train.jsonl / .valid.jsonl   {"prompt": dialogue, "completion": " one-sentence summary"}
                                                    train with --template (SUMMARY_TEMPLATE below)
    ticket-intent.train.jsonl / .valid.jsonl       {"messages": [user: instruction + message, assistant: label]}
                                                    an instruction the base model does not follow (it answers
                                                    in sentences, not with the label)
    tool-calls.train / .valid.jsonl                {"messages": [user asks, assistant calls, (tool result,
                                                    assistant answers)], "tools": [get_weather, convert_currency]}
                                                    function calling: the base model does not write the call
                                                    format; the held-out reference is the call (or the answer)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SUMMARY_TEMPLATE = "Summarize the following conversation.\n\n{prompt}\n\nSummary:"
SEED = 20261122

CUSTOMERS = ["Alice", "Bob", "Carmen", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
             "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
AGENTS = ["Sam", "Priya", "Tom", "Lena", "Marco", "Aiko", "Ben", "Nadia"]
PRODUCTS = ["wireless headphones", "coffee maker", "laptop stand", "running shoes", "desk lamp", "blender",
            "phone case", "backpack", "smart watch", "electric kettle", "yoga mat", "bluetooth speaker",
            "office chair", "air fryer", "winter jacket"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

# (problem as the customer says it, problem in the summary, agent's reply, resolution in the summary)
CASES = [
    ("my {product} from order {order} still hasn't arrived", "their {product} had not arrived",
     "I tracked the parcel: it is at the local depot and will be delivered on {day}.",
     "tracked the parcel and confirmed delivery on {day}"),
    ("the {product} I received in order {order} is damaged", "their {product} arrived damaged",
     "I'm sorry about that. I have sent a free replacement, and you can keep the damaged one.",
     "sent a free replacement"),
    ("I was charged twice for order {order}, the {product}", "they were charged twice for their {product}",
     "I see the duplicate charge. I have refunded it; it will show on your card within five days.",
     "refunded the duplicate charge"),
    ("I want to return the {product} from order {order}", "they wanted to return their {product}",
     "No problem. I have emailed you a prepaid return label; the refund follows once it arrives.",
     "emailed a prepaid return label"),
    ("I got the wrong item: order {order} should be a {product}", "they received the wrong item instead of a {product}",
     "My apologies. The right {product} ships today with express delivery, at no cost.",
     "shipped the correct {product} by express delivery"),
    ("I can't log in to my account to check order {order}", "they could not log in to check their {product} order",
     "I have reset your password and sent a link to your email address.",
     "reset their password and sent a login link"),
    ("I want to change the delivery address for order {order}, the {product}",
     "they wanted to change the delivery address for their {product}",
     "Done: the {product} will go to the new address, and the delivery date stays {day}.",
     "updated the delivery address"),
    ("the {product} from order {order} stopped working after a week", "their {product} stopped working",
     "That is covered by the warranty. I have booked a free repair and a courier will collect it on {day}.",
     "booked a free warranty repair with pickup on {day}"),
]
OPENERS = ["Hi, {problem}.", "Hello. {Problem}.", "Good morning, {problem}. Can you help?", "Hey there, {problem}!",
           "Hi, I need help: {problem}."]
ASKS = ["Hi {customer}, I'm {agent}. Could you confirm your order number?",
        "Thanks for reaching out, {customer}. This is {agent}; what is the order number?",
        "Hello {customer}, {agent} here. Can you give me the order number, please?"]
CONFIRMS = ["Sure, it's {order}.", "It is {order}.", "Yes, order {order}.", "The number is {order}."]
THANKS = ["Great, thank you!", "Thanks, that helps a lot.", "Perfect, thanks {agent}.", "OK, thank you for your help."]

INTENTS = {
    "billing": ["I was charged twice for my last order.", "Why is there an extra fee on my invoice?",
                "My card was billed but the payment shows as failed.", "Can I get a copy of my invoice for {product}?",
                "The price I paid for the {product} is higher than advertised."],
    "shipping": ["Where is my {product}? It was due {day}.", "My parcel has not moved in the tracking for days.",
                 "Can you ship the {product} to a different address?", "The courier left my {product} at the wrong door.",
                 "How long does delivery of the {product} take?"],
    "account": ["I forgot my password and the reset email never came.", "How do I change the email on my account?",
                "My account is locked after too many login attempts.", "Please delete my account and my data.",
                "I can't sign in with my phone number anymore."],
    "technical": ["The {product} won't turn on after charging.", "My {product} keeps disconnecting from bluetooth.",
                  "The app crashes when I open the {product} settings.", "The {product} makes a loud noise when running.",
                  "The screen of my {product} flickers."],
    "returns": ["I want to return the {product}, it doesn't fit.", "How do I send back the {product} I bought?",
                "Can I exchange my {product} for another colour?", "The return label for my {product} doesn't work.",
                "I changed my mind about the {product}; can I get my money back?"],
}
INTENT_INSTRUCTION = ("Classify the support message into one of: billing, shipping, account, technical, returns. "
                      "Reply with the label only.\n\nMessage: {message}")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def support_dialogue(rng: random.Random) -> tuple[str, str]:
    customer, agent = rng.choice(CUSTOMERS), rng.choice(AGENTS)
    slots = {"product": rng.choice(PRODUCTS), "order": f"{rng.randint(10000, 99999)}", "day": rng.choice(DAYS),
             "customer": customer, "agent": agent}
    said, summary_problem, reply, summary_fix = (t.format(**slots) for t in rng.choice(CASES))
    opener = rng.choice(OPENERS).format(problem=said, Problem=_cap(said))
    lines = [f"Customer: {opener}", f"Agent: {rng.choice(ASKS).format(**slots)}",
             f"Customer: {rng.choice(CONFIRMS).format(**slots)}", f"Agent: {reply}",
             f"Customer: {rng.choice(THANKS).format(**slots)}"]
    summary = f"{customer} contacted support because {summary_problem}, and {agent} {summary_fix}."
    return "\n".join(lines), summary


def ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(INTENTS))
    message = rng.choice(INTENTS[label]).format(product=rng.choice(PRODUCTS), day=rng.choice(DAYS))
    return INTENT_INSTRUCTION.format(message=message), label


# ---- tool calls -----------------------------------------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
CURRENCY_TOOL = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount of money from one currency to another",
    "parameters": {"type": "object", "properties": {
        "amount": {"type": "number"}, "from": {"type": "string", "description": "ISO 4217 code, e.g. EUR"},
        "to": {"type": "string", "description": "ISO 4217 code"}}, "required": ["amount", "from", "to"]}}}
TOOLS = [WEATHER_TOOL, CURRENCY_TOOL]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Seoul", "Toronto", "Cairo", "Sydney", "Madrid", "Hanoi", "Denver",
          "Zurich", "Dublin", "Santiago", "Osaka", "Accra"]
# (question, unit it asks for; None: celsius, the default the questions imply)
WEATHER_ASKS = [("What's the weather in {city}?", None), ("How warm is it in {city} right now?", None),
                ("Is it raining in {city} today?", None), ("Tell me the current weather for {city}.", None),
                ("What's the temperature in {city} in Fahrenheit?", "fahrenheit"),
                ("I'm flying to {city} tonight. How cold is it there, in Celsius?", "celsius"),
                ("Weather in {city}, please, in degrees Fahrenheit.", "fahrenheit"),
                ("Do I need a jacket in {city}? Check the weather.", None)]
CONDITIONS = ["sunny", "cloudy", "raining", "windy", "foggy", "snowing"]
# code: (the words people use for it, units per US dollar)
CURRENCIES = {"EUR": (["euros", "EUR"], 0.92), "USD": (["US dollars", "dollars"], 1.0),
              "GBP": (["British pounds", "pounds"], 0.79), "JPY": (["Japanese yen", "yen"], 151.0),
              "CHF": (["Swiss francs"], 0.9), "CAD": (["Canadian dollars"], 1.36), "INR": (["Indian rupees"], 83.0),
              "MXN": (["Mexican pesos"], 17.0)}
CURRENCY_ASKS = ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
                 "I have {amount} {src}. What is that in {dst}?", "What do {amount} {src} come to in {dst}?"]


def _call(n: int, name: str, args: dict) -> dict:
    return {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _weather(rng: random.Random) -> tuple[str, list[dict], list[tuple[dict, str]]]:
    """(question, calls, [(tool result, answer sentence)])."""
    city = rng.choice(CITIES)
    ask, unit = rng.choice(WEATHER_ASKS)
    unit = unit or "celsius"
    temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
    result = {"city": city, "temperature": temp, "unit": unit, "conditions": rng.choice(CONDITIONS)}
    answer = f"In {city} it is {temp} degrees {unit.capitalize()} and {result['conditions']}."
    return ask.format(city=city), [_call(1, "get_weather", {"city": city, "unit": unit})], [(result, answer)]


def _currency(rng: random.Random) -> tuple[str, list[dict], list[tuple[dict, str]]]:
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([5, 20, 50, 75, 100, 120, 250, 300, 1000, 1500])
    words = lambda code: rng.choice(CURRENCIES[code][0])  # noqa: E731
    question = rng.choice(CURRENCY_ASKS).format(amount=amount, src=words(src), dst=words(dst))
    value = round(amount / CURRENCIES[src][1] * CURRENCIES[dst][1], 2)
    result = {"amount": amount, "from": src, "to": dst, "result": value}
    answer = f"{amount} {src} is {value:,.2f} {dst}."
    return question, [_call(1, "convert_currency", {"amount": amount, "from": src, "to": dst})], [(result, answer)]


def _two_cities(rng: random.Random) -> tuple[str, list[dict], list[tuple[dict, str]]]:
    """Two calls in one turn (parallel tool calls); the line ends with them."""
    a, b = rng.sample(CITIES, 2)
    question = rng.choice(["Compare the weather in {a} and {b}.", "Is it warmer in {a} or in {b} right now?"])
    calls = [_call(n, "get_weather", {"city": city, "unit": "celsius"}) for n, city in ((1, a), (2, b))]
    return question.format(a=a, b=b), calls, []


def tool_use(rng: random.Random) -> dict:
    """One line: the user asks, the assistant calls; a third of the lines go on with the tool's result
    and the assistant's answer from it."""
    kind = rng.choices([_weather, _currency, _two_cities], weights=[4, 4, 1])[0]
    question, calls, results = kind(rng)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": calls}]
    if results and rng.random() < 1 / 3:
        for call, (result, _) in zip(calls, results):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
        messages.append({"role": "assistant", "content": " ".join(answer for _, answer in results)})
    return {"messages": messages, "tools": TOOLS}


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_demo(out: Path, *, n_train: int = 160, n_valid: int = 40) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    summaries = []
    for _ in range(n_train + n_valid):
        dialogue, summary = support_dialogue(rng)
        summaries.append({"prompt": dialogue, "completion": " " + summary})
    intents = []
    for _ in range(n_train + n_valid):
        prompt, label = ticket(rng)
        intents.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": label}]})
    tools = [tool_use(rng) for _ in range(n_train + n_valid)]  # after the others: their files stay as they were
    files = {
        "support-summaries.train": summaries[:n_train], "support-summaries.valid": summaries[n_train:],
        "ticket-intent.train": intents[:n_train], "ticket-intent.valid": intents[n_train:],
        "tool-calls.train": tools[:n_train], "tool-calls.valid": tools[n_train:],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        _write(paths[name], rows)
    return paths
