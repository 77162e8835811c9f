"""Write a traffic-like prompt set (customer-support chat for an online shop: orders, refunds, shipping, accounts,
product questions) and split it at random into a calibration file and a held-out file of the same distribution.

The prompts stand in for what `capture_dir` collects from a deployment (one tenant's traffic); the calibration
comparison (`benchmarks/calibration_source.py`) calibrates on the first file and scores on the second only.

  python benchmarks/make_traffic_prompts.py [--count 192] [--heldout 64] [--seed 7] [--out benchmarks/data]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Maria", "Jonas", "Aiko", "Priya", "Tom", "Fatima", "Lukas", "Chen", "Sofia", "Omar", "Elena", "Kwame"]
PRODUCTS = ["wireless headphones", "running shoes", "coffee grinder", "winter jacket", "phone case", "desk lamp",
            "yoga mat", "blender", "backpack", "smart watch", "bed sheets", "kettle", "gaming mouse", "rain boots"]
CARRIERS = ["DHL", "UPS", "the postal service", "a local courier", "FedEx"]
PROBLEMS = ["arrived broken", "is the wrong size", "never arrived", "stopped working after a week",
            "is a different colour than in the pictures", "was missing a part", "arrived two weeks late"]
CITIES = ["Lyon", "Munich", "Osaka", "Toronto", "Madrid", "Nairobi", "Melbourne", "Porto", "Gdansk", "Austin"]
TEMPLATES = [
    "Hi, I ordered the {product} on {day} (order {order}) and it {problem}. Can I get a refund or a replacement?",
    "My order {order} with the {product} says it was shipped with {carrier} {n} days ago but tracking has not "
    "updated since. What should I do?",
    "Hello, this is {name}. I want to return the {product} I bought last month because it {problem}. How does the "
    "return process work and who pays for shipping?",
    "Can you change the delivery address of order {order}? I am moving to {city} and the {product} should go there.",
    "I was charged twice for order {order} ({product}, {price} euros). Please explain and refund the extra charge.",
    "Is the {product} available in another colour, and how long does delivery to {city} usually take?",
    "I forgot my password and the reset email never arrives. My account email is {name_lower}@example.com. Can "
    "you help me log in?",
    "Write a short, polite reply to a customer named {name} whose {product} {problem}, offering a replacement.",
    "Summarize this complaint in one sentence: the customer {name} says the {product} {problem} and {carrier} "
    "refused to pick up the return.",
    "Does the {product} come with a warranty? Mine {problem} and I bought it {n} months ago.",
    "Can I cancel order {order}? I ordered the {product} by mistake {n} hours ago and it has not shipped yet.",
    "What is your policy for items that {problem}? I received a {product} from you yesterday.",
    "Translate into French: 'Your {product} will be delivered by {carrier} within {n} working days.'",
    "I would like to buy {n} units of the {product} for my office in {city}. Do you offer a discount for bulk "
    "orders?",
    "Classify the urgency of this message as low, medium or high: 'My {product} {problem}, I need it for a trip "
    "on {day}.'",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def make_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < count:
        name = rng.choice(NAMES)
        prompt = rng.choice(TEMPLATES).format(
            product=rng.choice(PRODUCTS), day=rng.choice(DAYS), order=f"#{rng.randint(100000, 999999)}",
            problem=rng.choice(PROBLEMS), carrier=rng.choice(CARRIERS), n=rng.randint(2, 9), name=name,
            name_lower=name.lower(), city=rng.choice(CITIES), price=rng.randint(15, 250))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=192)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = parser.parse_args()
    prompts = make_prompts(args.count, args.seed)
    random.Random(args.seed + 1).shuffle(prompts)
    splits = {"traffic_calibration.jsonl": prompts[args.heldout:], "traffic_heldout.jsonl": prompts[:args.heldout]}
    for name, items in splits.items():
        (args.out / name).write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in items))
        print(f"{args.out / name}: {len(items)} prompts")


if __name__ == "__main__":
    main()
