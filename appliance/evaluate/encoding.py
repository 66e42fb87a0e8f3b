"""Token ids every evaluation target is given: the prompt as the chat template renders it for
generation, and each candidate answer as the model would write it, up to its end-of-turn token."""

from __future__ import annotations

from typing import Any


def stop_ids(tokenizer: Any) -> list[int]:
    """The end-of-sequence token and any end-of-turn token the vocabulary has."""
    from appliance.export.contract import END_OF_TURN_CANDIDATES

    vocab = tokenizer.get_vocab()
    ids = [int(tokenizer.eos_token_id)]
    return ids + [vocab[t] for t in END_OF_TURN_CANDIDATES if t in vocab and vocab[t] not in ids]


def prompt_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    """The conversation rendered for the model's next turn."""
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def answer_ids(tokenizer: Any, conversation: list[dict[str, str]], answer: str) -> list[int]:
    """The tokens the model writes for `answer` after the conversation, its end-of-turn included (as
    trained). Earlier assistant turns (few-shot examples) belong to the prompt, not to the answer."""
    prompt = prompt_ids(tokenizer, conversation)
    full = list(tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": answer}],
                                              return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders an answer differently from its generation prompt; "
                         "answers are scored after the prompt, so this template is not supported")
    tail = full[len(prompt):]
    stops = set(stop_ids(tokenizer))
    end = next((i for i, token in enumerate(tail) if token in stops), len(tail) - 1)
    return tail[: end + 1]  # up to the end of the turn: what follows it is never generated
