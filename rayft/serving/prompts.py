"""How a chat becomes prompt tokens: one rule for the chat routes of `rayft serve` and for
`rayft eval`, so an evaluated answer is the answer the server gives to the same messages."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of `messages` rendered by the model's chat template, ending with the
    assistant's generation prompt.

    Rendered to text, then tokenized without special tokens: the template writes the ones it
    wants itself (BOS, turn markers), and a tokenizer that also adds its own would start the
    prompt with a BOS the model never saw in training.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
