"""The R1-Searcher prompts (SPEC section 1), verbatim.

The authors wrote `</think>\\n\\n<answer>` inside Python string literals, so the
prompts the released models saw hold two real newlines there.
"""
from __future__ import annotations

from typing import Sequence

# The tags are plain text, not added special tokens (SPEC section 1).
BEGIN_QUERY, END_QUERY = "<|begin_of_query|>", "<|end_of_query|>"
BEGIN_DOCUMENTS, END_DOCUMENTS = "<|begin_of_documents|>", "<|end_of_documents|>"

_INSTRUCTIONS = (
    "The output format of reasoning process and final answer are enclosed within <think> "
    "</think> and <answer> </answer> tags, respectively, i.e., \"<think> reasoning process here "
    "</think>\n\n<answer> final answer here </answer>\".\n"
    "During the thinking process, {can_search} if "
    "necessary with the format of \"<|begin_of_query|> search query (only list keywords, such as "
    "**\"keyword_1 keyword_2 ...\"**)<|end_of_query|>\". **A query must involve only a single "
    "triple**.\n"
    "Then, the search system will provide {whom} with the retrieval information with the format "
    "of \"<|begin_of_documents|> ...search results... <|end_of_documents|>\".")

BASE_PROMPT = (
    "The User asks a question, and the Assistant solves it.\n"
    "The Assistant first thinks about the reasoning process in the mind and then provides the "
    "User with the final answer.\n"
    + _INSTRUCTIONS.format(
        can_search="**the Assistant can perform searching** for uncertain knowledge",
        whom="the Assistant")
    + "\n\nUser:{question}\nAssistant: <think>")

INSTRUCT_SYSTEM = (
    "You are a helpful assistant.\n"
    "Given a question, you should answer it by first thinking about the reasoning process in the "
    "mind and then providing the final answer.\n"
    + _INSTRUCTIONS.format(
        can_search="**you can perform searching for uncertain knowledge**", whom="you"))


def base_prompt(question: str) -> str:
    """The base-model prompt, ending in `Assistant: <think>`."""
    return BASE_PROMPT.format(question=question)


def instruct_prompt(question: str, tokenizer) -> str:
    """The chat-template prompt for instruct models, with `<think>` appended."""
    messages = [{"role": "system", "content": INSTRUCT_SYSTEM},
                {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "<think>"


def documents_text(rendered_passages: Sequence[str]) -> str:
    """The inside of a document block: "(1)p1\\n(2)p2\\n..."; "None" when nothing was found."""
    if not rendered_passages:
        return "None"
    return "".join(f"({i}){text}\n" for i, text in enumerate(rendered_passages, start=1))


def documents_block(rendered_passages: Sequence[str]) -> str:
    """The whole text the environment appends after a query (SPEC section 2)."""
    return (f"\n\n{BEGIN_DOCUMENTS}\n" + documents_text(rendered_passages)
            + f"{END_DOCUMENTS}\n\n")


def rag_question(question: str, rendered_passages: Sequence[str]) -> str:
    """Standard RAG's question (the paper's Naive-RAG baseline): the documents retrieved for
    the question, in the environment's block format, before the question itself; it fills
    the prompt's question slot, so the model reads them before it starts to think."""
    return documents_block(rendered_passages).removeprefix("\n\n") + question


PROMPT_STYLES = ("base", "instruct")


def strip_documents(response: str) -> str:
    """A response without its document blocks (`<|begin_of_documents|>` up to the
    next `<|end_of_documents|>`, both tags included): the text the policy wrote, as far as a
    trace without token masks can tell. A block left open runs to the end of the text."""
    out, start = [], 0
    while True:
        begin = response.find(BEGIN_DOCUMENTS, start)
        if begin < 0:
            out.append(response[start:])
            return "".join(out)
        out.append(response[start:begin])
        end = response.find(END_DOCUMENTS, begin)
        if end < 0:
            return "".join(out)
        start = end + len(END_DOCUMENTS)


def prompt_ids(tokenizer, question: str, style: str) -> list[int]:
    """The token ids of a question's prompt: "base" (no chat template; the tokenizer's own
    special tokens, e.g. Llama's BOS) or "instruct" (the chat template, which already holds
    them)."""
    if style == "base":
        return list(tokenizer(base_prompt(question))["input_ids"])
    if style == "instruct":
        return list(tokenizer.encode(instruct_prompt(question, tokenizer), add_special_tokens=False))
    raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
