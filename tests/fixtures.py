"""Small preference datasets in the real public formats, and writers for the local file formats.

The rows imitate the real files field for field (Anthropic HH-RLHF transcripts, stanfordnlp/SHP
rows, HuggingFaceH4/stack-exchange-preferences rows with nested answers) so that the loaders are
tested on the shapes they meet in practice. Tests write them into `tmp_path`; nothing binary is
committed.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet

# ---- writers ----------------------------------------------------------------------------------


def _write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line, gzipped when the name ends in .gz (as the real HH files are)."""
    return _write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def write_json_array(path: Path, rows: list) -> Path:
    return _write_bytes(path, json.dumps(rows, indent=1).encode("utf-8"))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)
    return _write_bytes(path, buffer.getvalue())


def write_text(path: Path, text: str) -> Path:
    return _write_bytes(path, text.encode("utf-8"))


def read_jsonl(path: Path) -> list:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def read_parquet(path: Path) -> list[dict]:
    return pyarrow.parquet.read_table(path).to_pylist()


# ---- Anthropic HH-RLHF --------------------------------------------------------------------------

EGG_PROMPT = "\n\nHuman: How long should I boil an egg for a runny yolk?\n\nAssistant:"
CAPITAL_PROMPT = (
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris."
    "\n\nHuman: And of Italy?\n\nAssistant:"
)
SILENT_PROMPT = "\n\nHuman: Can you stay quiet for a second?\n\nAssistant:"
GREETING_PROMPT = "\n\nHuman: Hi there!\n\nAssistant:"

HH_ROWS = [
    {"chosen": EGG_PROMPT + " About six minutes in boiling water, then cool it under cold water.",
     "rejected": EGG_PROMPT + " Eggs are not something I can help with."},
    {"chosen": CAPITAL_PROMPT + " The capital of Italy is Rome.",
     "rejected": CAPITAL_PROMPT + " Paris."},
    # The second comparison for the same prompt: its chosen reply becomes the SFT target.
    {"chosen": EGG_PROMPT + " Lower it into simmering water for six minutes.",
     "rejected": EGG_PROMPT + " Twenty minutes."},
    # Real quirk: the rejected transcript belongs to a different conversation.
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the scarecrow win an award? He was outstanding in his field.",
     "rejected": "\n\nHuman: Tell me a story.\n\nAssistant: Once upon a time there was a fox."},
    # Real quirk: an empty chosen response.
    {"chosen": SILENT_PROMPT, "rejected": SILENT_PROMPT + " Sure, I will wait."},
    # Real quirk: chosen == rejected.
    {"chosen": GREETING_PROMPT + " Hello! How can I help you today?",
     "rejected": GREETING_PROMPT + " Hello! How can I help you today?"},
]

# hh_rows_to_data(HH_ROWS) before clean_pairs, worked out by hand.
HH_EXPECTED = {
    EGG_PROMPT: {
        "responses": [" About six minutes in boiling water, then cool it under cold water.",
                      " Eggs are not something I can help with.",
                      " Lower it into simmering water for six minutes.",
                      " Twenty minutes."],
        "pairs": [(0, 1), (2, 3)],
        "sft_target": " Lower it into simmering water for six minutes.",
    },
    CAPITAL_PROMPT: {
        "responses": [" The capital of Italy is Rome.", " Paris."],
        "pairs": [(0, 1)],
        "sft_target": " The capital of Italy is Rome.",
    },
    SILENT_PROMPT: {"responses": ["", " Sure, I will wait."], "pairs": [(0, 1)], "sft_target": ""},
    GREETING_PROMPT: {
        "responses": [" Hello! How can I help you today?", " Hello! How can I help you today?"],
        "pairs": [(0, 1)],
        "sft_target": " Hello! How can I help you today?",
    },
}

HH_DIFFERENT_PROMPT = "rows whose rejected transcript has a different prompt"

# ---- stanfordnlp/SHP ----------------------------------------------------------------------------

PAN_HISTORY = "What pan should I use to sear a steak? I only have nonstick and a cast iron skillet."
BREAD_HISTORY = "Why does my sourdough come out flat?"
TEA_HISTORY = "Is it okay to reuse tea leaves?"


def shp_row(post_id, history, ref_a, ref_b, score_a, score_b, labels, created_a=1591126012, created_b=1591128808):
    """One row with every field the real stanfordnlp/SHP rows have."""
    return {
        "post_id": post_id,
        "domain": "askculinary_train",
        "upvote_ratio": 0.97,
        "history": history,
        "c_root_id_A": f"{post_id}a",
        "c_root_id_B": f"{post_id}b",
        "created_at_utc_A": created_a,
        "created_at_utc_B": created_b,
        "score_A": score_a,
        "score_B": score_b,
        "human_ref_A": ref_a,
        "human_ref_B": ref_b,
        "labels": labels,
        "seconds_difference": float(created_b - created_a),
        "score_ratio": (score_a / score_b) if score_b else float(score_a),
    }


SHP_ROWS = [
    shp_row("himc90", PAN_HISTORY, "Cast iron, as hot as you can get it.", "Either works fine.", 52, 10, 1),
    shp_row("himc90", PAN_HISTORY, "Nonstick, low heat.", "Cast iron, and pat the steak dry first.", 3, 80, 0),
    # Ratio 1.5: too close to call, skipped.
    shp_row("himc90", PAN_HISTORY, "Whatever you like.", "Cast iron.", 10, 15, 0),
    # A zero score against a positive one is an infinite ratio: kept.
    shp_row("k2p1zz", BREAD_HISTORY, "Your starter is too weak.", "Bake it longer.", 7, 0, 1),
    # Both zero: no preference, skipped.
    shp_row("t0t0aa", TEA_HISTORY, "Yes.", "No.", 0, 0, 1),
]

SHP_PAN_PROMPT = "\n\nHuman: " + PAN_HISTORY + "\n\nAssistant:"
SHP_BREAD_PROMPT = "\n\nHuman: " + BREAD_HISTORY + "\n\nAssistant:"

SHP_EXPECTED = {
    SHP_PAN_PROMPT: {
        "responses": [" Cast iron, as hot as you can get it.", " Either works fine.",
                      " Nonstick, low heat.", " Cast iron, and pat the steak dry first."],
        "pairs": [(0, 1), (3, 2)],
        "sft_target": " Cast iron, and pat the steak dry first.",
    },
    SHP_BREAD_PROMPT: {
        "responses": [" Your starter is too weak.", " Bake it longer."],
        "pairs": [(0, 1)],
        "sft_target": " Your starter is too weak.",
    },
}

SHP_SKIPPED = {"pairs with score ratio below 2": 1, "pairs with both scores zero": 1}

# ---- HuggingFaceH4/stack-exchange-preferences ------------------------------------------------------

SE_QUESTION_HTML = (
    "<p>I'm trying to reverse a list in Python &amp; keep the original. I tried <code>list.reverse()</code>"
    " but it returns <code>None</code>:</p>\n\n"
    "<pre><code>items = [1, 2, 3]\nreversed_items = items.reverse()\nprint(reversed_items)  # None\n</code></pre>\n\n"
    "<p>What's the idiomatic way?</p>\n"
)
SE_QUESTION_TEXT = (
    "I'm trying to reverse a list in Python & keep the original. I tried <code>list.reverse()</code>"
    " but it returns <code>None</code>:\n\n"
    "<code>items = [1, 2, 3]\nreversed_items = items.reverse()\nprint(reversed_items)  # None\n</code>\n\n"
    "What's the idiomatic way?"
)
SE_PROMPT = "\n\nHuman: " + SE_QUESTION_TEXT + "\n\nAssistant:"


def se_answer(answer_id, pm_score, text, selected=False):
    """One answer dict with every field the real dataset's nested answers have."""
    return {
        "answer_id": answer_id,
        "author": f"user{answer_id}",
        "author_id": answer_id * 7,
        "author_profile": f"https://stackoverflow.com/users/{answer_id * 7}",
        "pm_score": pm_score,
        "selected": selected,
        "text": text,
    }


def se_row(qid, question, answers):
    """One row with every field the real dataset has."""
    return {
        "qid": qid,
        "question": question,
        "answers": answers,
        "date": "2010/03/15",
        "metadata": [f"https://stackoverflow.com/questions/{qid}", "https://stackoverflow.com",
                     "https://stackoverflow.com/users/1"],
    }


SE_ROWS = [
    se_row(2428, SE_QUESTION_HTML, [
        se_answer(11, 5, "<p>Use slicing: <code>items[::-1]</code>.</p>\n"),
        se_answer(12, 2, "<p>Write a loop.</p>"),
        se_answer(13, 5, "<p>Use <code>reversed()</code>:</p>\n<pre><code>list(reversed(items))\n</code></pre>"),
        se_answer(14, 9, "<p><code>reverse()</code> works in place &amp; returns <code>None</code>; use "
                         "<code>items[::-1]</code> for a copy.</p>", selected=True),
    ]),
    se_row(3001, "<p>How do I exit Vim?</p>", [se_answer(21, 1, "<p>Type <code>:q</code>.</p>")]),
]

SE_EXPECTED = {
    SE_PROMPT: {
        "responses": [" Use slicing: <code>items[::-1]</code>.",
                      " Write a loop.",
                      " Use <code>reversed()</code>:\n\n<code>list(reversed(items))\n</code>",
                      " <code>reverse()</code> works in place & returns <code>None</code>; use "
                      "<code>items[::-1]</code> for a copy."],
        # Answers 0 and 2 both scored 5: no pair between them.
        "pairs": [(0, 1), (3, 0), (2, 1), (3, 1), (3, 2)],
        "sft_target": " <code>reverse()</code> works in place & returns <code>None</code>; use "
                      "<code>items[::-1]</code> for a copy.",
    },
    "\n\nHuman: How do I exit Vim?\n\nAssistant:": {
        "responses": [" Type <code>:q</code>."], "pairs": [], "sft_target": " Type <code>:q</code>.",
    },
}


def many_se_rows(n: int) -> list[dict]:
    """`n` distinct questions, each with two answers of different scores (for the 1% test split)."""
    return [
        se_row(qid, f"<p>Question number {qid}?</p>",
               [se_answer(qid * 10, 3, f"<p>Good answer {qid}.</p>"), se_answer(qid * 10 + 1, 1, f"<p>Weak answer {qid}.</p>")])
        for qid in range(n)
    ]


# ---- local pair format --------------------------------------------------------------------------


def pair_rows(n_prompts: int, pairs_per_prompt: int = 1) -> list[dict]:
    """`{prompt, chosen, rejected}` rows over `n_prompts` distinct prompts."""
    return [
        {"prompt": f"Question {p}: what is {p} + {p}?", "chosen": f" {2 * p}.", "rejected": f" {2 * p + k + 1}."}
        for p in range(n_prompts)
        for k in range(pairs_per_prompt)
    ]


def write_shards(folder: Path, split: str, rows: list[dict], n_shards: int) -> list[Path]:
    """`rows` as the Hugging Face hub stores a split: parquet shards `<split>-00000-of-0000N.parquet`, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // n_shards)
    return [write_parquet(folder / f"{split}-{index:05d}-of-{n_shards:05d}.parquet",
                          rows[index * size:(index + 1) * size])
            for index in range(n_shards)]


# ---- other public preference formats (not accepted: their rows get a clear error) -------------------

# OpenAI's preference fine-tuning JSONL: chat messages under input/preferred_output/non_preferred_output.
OPENAI_PREFERENCE_ROW = {
    "input": {"messages": [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}],
              "tools": [], "parallel_tool_calls": True},
    "preferred_output": [{"role": "assistant", "content": "Today in San Francisco, it is not quite cold as expected."}],
    "non_preferred_output": [{"role": "assistant", "content": "It is not particularly cold in San Francisco today."}],
}

# lvwerra/stack-exchange-paired: one question with a better (j) and a worse (k) answer.
STACK_EXCHANGE_PAIRED_ROW = {
    "qid": 2428,
    "question": "How do I reverse a list in Python and keep the original?",
    "date": "2010/03/15",
    "metadata": ["https://stackoverflow.com/questions/2428", "https://stackoverflow.com",
                 "https://stackoverflow.com/users/1"],
    "response_j": "Use slicing: items[::-1] returns a reversed copy.",
    "response_k": "Call items.reverse().",
}
