"""A synthetic tool-use task, generated offline from seeded templates (for TL-Training: `tl_weights` SFT, then the
`tl_training` recipe's PPO with the error-category reward).

Each record is a short trajectory in chat form with OpenAI tool schemas:

    system     the available tools (3 to 6 of the 6 below, always including the right one), one line each
    user       a request, e.g. "What's the weather in Paris in celsius?"
    [assistant a call with a hallucinated argument name, and the tool's TypeError]    (error_fraction of records)
    assistant  the right call: tool_calls [{"function": {"name": "get_weather", "arguments": {"city": "Paris",
               "unit": "celsius"}}}]
    tool       the tool's JSON result                       (answers: true, the default)
    assistant  a one-sentence answer from the result        (answers: true)

The tools come in look-alike pairs (get_weather / get_forecast, search_news / search_flights) so that the tokens
choosing the tool matter (PKT), and some phrasings give an optional argument, so that a call can have missing or
redundant arguments (the reward's categories). Train and eval requests are disjoint.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from .datasets_builtin import _check_sizes, _write_jsonl

CITIES = ["Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Seoul", "Dublin", "Vienna",
          "Prague", "Lisbon", "Toronto", "Sydney", "Nairobi", "Helsinki", "Athens", "Warsaw", "Denver"]
TOPICS = ["electric cars", "the world cup", "climate policy", "space telescopes", "chess", "vaccines",
          "the stock market", "renewable energy", "video games", "bird migration", "quantum computing", "jazz"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]
TASKS = ["call mom", "water the plants", "buy milk", "submit the report", "book a dentist appointment",
         "take the medicine", "feed the cat", "pay the rent"]
TIMES = ["7:30", "9:00", "12:15", "14:45", "18:00", "21:30"]
UNITS = ["celsius", "fahrenheit"]
SYSTEM = "You are an assistant that answers requests by calling one of these tools.\n{tools}"


def _param(kind: str, text: str, **extra) -> dict:
    return {"type": kind, "description": text, **extra}


TOOLS = {
    "get_weather": ("current weather in a city",
                    {"city": _param("string", "city name"),
                     "unit": _param("string", "temperature unit", enum=UNITS)}, ["city"]),
    "get_forecast": ("weather forecast for the next days",
                     {"city": _param("string", "city name"), "days": _param("integer", "1 to 7"),
                      "unit": _param("string", "temperature unit", enum=UNITS)}, ["city", "days"]),
    "search_news": ("recent news articles on a topic",
                    {"query": _param("string", "what to search for"),
                     "limit": _param("integer", "how many articles")}, ["query"]),
    "search_flights": ("flights between two cities on a date",
                       {"origin": _param("string", "departure city"), "destination": _param("string", "arrival city"),
                        "date": _param("string", "YYYY-MM-DD")}, ["origin", "destination", "date"]),
    "convert_currency": ("convert an amount between currencies",
                         {"amount": _param("number", "amount of money"),
                          "from_currency": _param("string", "ISO code"), "to_currency": _param("string", "ISO code")},
                         ["amount", "from_currency", "to_currency"]),
    "set_reminder": ("remind the user of something at a time",
                     {"text": _param("string", "what to remember"), "time": _param("string", "HH:MM")},
                     ["text", "time"]),
}
# A wrong argument name for each tool (the first call of an erroneous trajectory uses it).
HALLUCINATED = {"get_weather": ("city", "location"), "get_forecast": ("days", "num_days"),
                "search_news": ("query", "q"), "search_flights": ("origin", "from_city"),
                "convert_currency": ("amount", "value"), "set_reminder": ("text", "message")}


def schema(name: str) -> dict:
    text, props, required = TOOLS[name]
    return {"type": "function", "function": {"name": name, "description": text, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def describe(name: str) -> str:
    """`- name(a: string, b?: integer): what it does` (? = optional)."""
    text, props, required = TOOLS[name]
    args = ", ".join(f"{k}{'' if k in required else '?'}: {p['type']}" for k, p in props.items())
    return f"- {name}({args}): {text}"


def _request(rng: random.Random) -> tuple[str, str, dict, dict]:
    """(user text, tool, arguments, the tool's result) for one random request."""
    tool = rng.choice(sorted(TOOLS))
    city, unit, days = rng.choice(CITIES), rng.choice(UNITS), rng.randint(2, 7)
    if tool == "get_weather":
        temp = rng.randint(-5, 35)
        text, args = rng.choice([
            (f"What's the weather in {city}?", {"city": city}),
            (f"What's the weather in {city} in {unit}?", {"city": city, "unit": unit}),
            (f"Tell me the current weather for {city}.", {"city": city}),
            (f"How warm is it in {city} right now, in {unit}?", {"city": city, "unit": unit})])
        return text, tool, args, {"city": city, "temperature": temp, "unit": args.get("unit", "celsius")}
    if tool == "get_forecast":
        text, args = rng.choice([
            (f"What will the weather be like in {city} over the next {days} days?", {"city": city, "days": days}),
            (f"Give me a {days}-day forecast for {city} in {unit}.", {"city": city, "days": days, "unit": unit}),
            (f"Forecast for {city}, {days} days please.", {"city": city, "days": days})])
        return text, tool, args, {"city": city, "days": days, "summary": rng.choice(["sunny", "rainy", "cloudy"])}
    if tool == "search_news":
        topic, limit = rng.choice(TOPICS), rng.randint(2, 9)
        text, args = rng.choice([
            (f"Find news about {topic}.", {"query": topic}),
            (f"Show me the latest {limit} headlines about {topic}.", {"query": topic, "limit": limit}),
            (f"Any recent articles on {topic}?", {"query": topic})])
        return text, tool, args, {"query": topic, "articles": args.get("limit", 5)}
    if tool == "search_flights":
        origin, destination = rng.sample(CITIES, 2)
        date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        text = rng.choice([f"Find flights from {origin} to {destination} on {date}.",
                           f"I need to fly from {origin} to {destination}, departing {date}."])
        return text, tool, {"origin": origin, "destination": destination, "date": date}, \
            {"flights": rng.randint(1, 12), "cheapest": rng.randint(60, 900)}
    if tool == "convert_currency":
        amount = rng.randint(5, 500)
        source, target = rng.sample(CURRENCIES, 2)
        text = rng.choice([f"Convert {amount} {source} to {target}.", f"How much is {amount} {source} in {target}?"])
        return text, tool, {"amount": amount, "from_currency": source, "to_currency": target}, \
            {"result": round(amount * rng.uniform(0.5, 1.5), 2), "currency": target}
    task, time = rng.choice(TASKS), rng.choice(TIMES)
    text = rng.choice([f"Remind me to {task} at {time}.", f"Set a reminder at {time} to {task}."])
    return text, tool, {"text": task, "time": time}, {"status": "scheduled", "time": time}


def _answer(tool: str, result: dict) -> str:
    if tool == "get_weather":
        return f"It is {result['temperature']} degrees {result['unit']} in {result['city']}."
    if tool == "get_forecast":
        return f"The next {result['days']} days in {result['city']} look {result['summary']}."
    if tool == "search_news":
        return f"I found {result['articles']} articles about {result['query']}."
    if tool == "search_flights":
        return f"There are {result['flights']} flights; the cheapest costs {result['cheapest']}."
    if tool == "convert_currency":
        return f"That is {result['result']} {result['currency']}."
    return f"Done: the reminder is set for {result['time']}."


def _call(name: str, args: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": dict(args)}}]}


def tool_record(rng: random.Random, error_fraction: float, answers: bool = True) -> tuple[dict, str, str]:
    """(record, user text, tool) for one trajectory; answers: false ends it at the right call (shorter SFT)."""
    text, tool, args, result = _request(rng)
    others = [t for t in sorted(TOOLS) if t != tool]
    offered = [tool] + rng.sample(others, rng.randint(2, len(others)))
    rng.shuffle(offered)
    messages = [{"role": "system", "content": SYSTEM.format(tools="\n".join(describe(t) for t in offered))},
                {"role": "user", "content": text}]
    if rng.random() < error_fraction:
        right, wrong = HALLUCINATED[tool]
        bad = {(wrong if k == right else k): v for k, v in args.items()}
        messages += [_call(tool, bad), {"role": "tool", "content":
                                        f"TypeError: {tool}() got an unexpected keyword argument '{wrong}'"}]
    messages.append(_call(tool, args))
    if answers:
        messages += [{"role": "tool", "content": json.dumps(result)},
                     {"role": "assistant", "content": _answer(tool, result)}]
    return {"messages": messages, "tools": [schema(t) for t in offered]}, text, tool


def tool_records(n: int, seed: int = 0, error_fraction: float = 0.2, exclude: set[str] = frozenset(),
                 answers: bool = True) -> list:
    """n (record, tool) pairs with distinct user requests, none in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(n * 50):
        record, text, tool = tool_record(rng, error_fraction, answers)
        if text not in seen:
            seen.add(text)
            out.append((record, tool))
            if len(out) == n:
                return out
    from .errors import TokentuneError

    raise TokentuneError(f"could not draw {n} distinct tool requests", where="n_train / n_eval", fix="ask for fewer")


def write_tools(out_dir, n_train: int = 400, n_eval: int = 100, seed: int = 0, error_fraction: float = 0.2,
                answers: bool = True) -> dict:
    """train.jsonl and eval.jsonl (disjoint requests; eval has no erroneous calls); paths and per-tool counts."""
    _check_sizes(n_train, n_eval)
    evals = tool_records(n_eval, seed + 1, 0.0, answers=answers)
    requests = {r["messages"][1]["content"] for r, _ in evals}
    train = tool_records(n_train, seed, error_fraction, exclude=requests, answers=answers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"tools": sorted(TOOLS)}
    for split, pairs in (("train", train), ("eval", evals)):
        info[split] = out / f"{split}.jsonl"
        _write_jsonl(info[split], [r for r, _ in pairs])
        info[f"n_{split}"] = len(pairs)
        info[f"{split}_counts"] = dict(sorted(Counter(t for _, t in pairs).items()))
    info["train_with_error"] = sum(any(m["role"] == "tool" and "TypeError" in m["content"] for m in r["messages"])
                                   for r, _ in train)
    return info
