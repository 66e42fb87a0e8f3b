"""The shipped sample dataset: IT-helpdesk tickets with a category label and planted PII.

Deterministic: the same seed always writes the same file, so `samples/helpdesk.csv` can be
checked against this generator. Some tickets repeat exactly and some are paraphrases of others,
as in real exports, so deduplication has something to find.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

CATEGORIES: dict[str, list[str]] = {
    "access": [
        "I can't log in to {system} since this morning, it says my password expired.",
        "Please reset my password for {system}; I am locked out after three attempts.",
        "New starter {name} needs an account on {system} and the shared drive by Monday.",
        "My MFA token stopped working after I changed phones. I cannot reach {system}.",
        "Could you give me read access to the {team} folder on {system}?",
    ],
    "hardware": [
        "The laptop screen flickers when I unplug the charger. Asset tag {asset}.",
        "Printer on floor {floor} jams on every second page and shows error {code}.",
        "My docking station no longer detects the second monitor.",
        "Keyboard keys are sticking on the laptop with asset tag {asset}.",
        "The battery on my laptop drains in under an hour, asset {asset}.",
    ],
    "network": [
        "VPN disconnects every few minutes when working from home.",
        "Wi-Fi on floor {floor} is very slow since yesterday afternoon.",
        "I cannot reach the file server at {ip} from the meeting room.",
        "The VPN client reports error {code} right after entering my credentials.",
        "Network drive mapping fails at login for everyone in {team}.",
    ],
    "software": [
        "{system} crashes when I export a report to PDF.",
        "Please install the latest version of {app} on my workstation.",
        "{app} shows a licence error on startup since the update.",
        "Excel macros in the {team} budget file stopped running after the upgrade.",
        "The {app} add-in is missing from the toolbar.",
    ],
    "billing": [
        "I was charged twice for the {app} subscription, card {card}.",
        "Please update the company card on file to {card} for the {app} licence.",
        "Invoice for {team} shows the wrong cost centre; refund to IBAN {iban}.",
        "Our {app} renewal failed; the card ending in our records needs replacing with {card}.",
    ],
    "security": [
        "I received a suspicious email asking for my password, sender {email}.",
        "I accidentally pasted our API key {key} in a public chat channel.",
        "Unknown login to {system} from {ip} on my account last night.",
        "A colleague shared the database URL postgres://app:{password}@db.internal/prod in a ticket.",
        "Phishing message impersonating IT support, reply-to {email}.",
    ],
}
DETAILS: dict[str, list[str]] = {
    "access": ["I already tried the self-service reset page twice.", "It worked fine last Friday.",
               "My manager approved the request on {day}.", "The error mentions an expired certificate.",
               "I need it before the quarter-end close.", "Other people in {team} can log in normally."],
    "hardware": ["It started after the office move on {day}.", "I have restarted it {count} times already.",
                 "The device is still under warranty.", "There is a burning smell when it heats up.",
                 "It happens both at my desk and in meeting rooms.", "A spare unit would be fine for now."],
    "network": ["Speedtest shows {count} Mbit/s instead of the usual hundreds.", "Cable connections work fine.",
                "It started around {time}.", "Colleagues on the same floor have the same issue.",
                "I am connecting from a hotel this week.", "Rebooting the router at home did not help."],
    "software": ["I am on version {count}.2 if that matters.", "Reinstalling did not change anything.",
                 "It happens with every file, not just one.", "The log mentions error {code}.",
                 "I need it for a client presentation on {day}.", "Safe mode shows the same behaviour."],
    "billing": ["Finance asked me to raise it here.", "The charge appeared on {day}.",
                "Our purchase order number is PO-{count}8812.", "Please confirm once it is sorted.",
                "The amount was {count}99 EUR.", "We cancelled the old plan last month."],
    "security": ["I have not clicked any link.", "I changed my password right away.",
                 "The message looked like it came from our CEO.", "It happened around {time}.",
                 "Should I report it to the data protection officer as well?", "I forwarded it as an attachment."],
}
GREETINGS = ["", "", "Hi, ", "Hello team, ", "Good morning, ", "Hey IT, ", "Dear support, "]
CLOSINGS = ["", "", "", "Thanks!", "Many thanks in advance.", "Regards.", "Cheers."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
FOLLOW_UPS = [
    "You can reach me at {email}.",
    "Call me on {phone} if you need more details.",
    "My extension is {phone}.",
    "Thanks, {name}.",
    "This is urgent, we have a client meeting at 3pm.",
    "I am working from home this week, at {address}.",
    "",
]
PARAPHRASE_PREFIXES = ["Hi team, ", "Hello, ", "Good morning. ", "Hi IT, "]
NAMES = ["Maria Lopez", "Jan Kowalski", "Aisha Khan", "Tom Becker", "Li Wei", "Sara Rossi", "Omar Haddad"]
ADDRESSES = ["18 Harbour Lane, Bristol BS1 4DJ", "Kerkstraat 41, 1017 GC Amsterdam", "742 Evergreen Terrace, "
             "Springfield, IL 62704", "Lindenstraße 7, 10969 Berlin", "88 Kings Road, Leeds LS6 1AB",
             "Via Garibaldi 23, 20121 Milano", "12 rue des Lilas, 69003 Lyon"]  # each person's home
SYSTEMS = ["SAP", "Salesforce", "the HR portal", "Jira", "the expense tool", "SharePoint"]
APPS = ["Adobe Acrobat", "Zoom", "Teams", "Tableau", "AutoCAD", "Slack"]
TEAMS = ["Finance", "Legal", "Marketing", "Operations", "Research"]
DOMAINS = ["example.com", "contoso.org", "mail.example.net"]
# Valid test card numbers (Luhn) and IBANs (mod-97) from public documentation examples.
CARDS = ["4111 1111 1111 1111", "5500 0000 0000 0004", "3400 000000 00009", "4012 8888 8888 1881"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB29 NWBK 6016 1331 9268 19", "FR14 2004 1010 0505 0001 3M02 606"]


def _fill(rng: random.Random, template: str) -> str:
    name = rng.choice(NAMES)
    user = name.lower().replace(" ", ".")
    values = {
        "name": name,
        "address": ADDRESSES[NAMES.index(name)],  # drawn with the name: the random sequence stays as it was
        "system": rng.choice(SYSTEMS),
        "app": rng.choice(APPS),
        "team": rng.choice(TEAMS),
        "asset": f"LT-{rng.randint(10000, 99999)}",
        "floor": str(rng.randint(1, 12)),
        "code": f"0x{rng.randint(4096, 65535):04X}",
        "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "email": f"{user}@{rng.choice(DOMAINS)}",
        "phone": f"+1 415 555 {rng.randint(100, 199):04d}",
        "card": rng.choice(CARDS),
        "iban": rng.choice(IBANS),
        "key": "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
        "password": "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(12)),
        "day": rng.choice(DAYS),
        "time": f"{rng.randint(7, 19)}:{rng.choice(['00', '15', '30', '45'])}",
        "count": str(rng.randint(2, 9)),
    }
    return template.format(**values)


def generate(rows: int = 480, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    tickets: list[dict[str, str]] = []
    categories = sorted(CATEGORIES)
    while len(tickets) < rows:
        roll = rng.random()
        if tickets and roll < 0.03:  # an exact re-submission
            tickets.append(dict(rng.choice(tickets)))
            continue
        if tickets and roll < 0.07:  # a light paraphrase of an earlier ticket
            earlier = rng.choice(tickets)
            tickets.append({"text": rng.choice(PARAPHRASE_PREFIXES) + earlier["text"],
                            "category": earlier["category"]})
            continue
        category = rng.choice(categories)
        body = _fill(rng, rng.choice(CATEGORIES[category]))
        greeting = rng.choice(GREETINGS)
        if greeting:
            body = greeting + body[0].lower() + body[1:] if not body.startswith(("I ", "I'")) else greeting + body
        details = rng.sample(DETAILS[category], k=rng.randint(0, 2))
        parts = [body, *(_fill(rng, d) for d in details), _fill(rng, rng.choice(FOLLOW_UPS)), rng.choice(CLOSINGS)]
        tickets.append({"text": " ".join(p for p in parts if p), "category": category})
    return [{"ticket_id": f"T{1000 + i}", **t} for i, t in enumerate(tickets)]


def to_csv(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["ticket_id", "text", "category"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def shipped_path() -> Path:
    return Path(__file__).parent / "samples" / "helpdesk.csv"


if __name__ == "__main__":
    shipped_path().parent.mkdir(exist_ok=True)
    shipped_path().write_text(to_csv(generate()), encoding="utf-8")
    print(f"wrote {shipped_path()}")
