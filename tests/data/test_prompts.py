"""The prompts are SPEC's text exactly."""
from searcher_jax.data import prompts
from searcher_jax.model import hf_io

EXPECTED_BASE = """The User asks a question, and the Assistant solves it.
The Assistant first thinks about the reasoning process in the mind and then provides the User with the final answer.
The output format of reasoning process and final answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "<think> reasoning process here </think>

<answer> final answer here </answer>".
During the thinking process, **the Assistant can perform searching** for uncertain knowledge if necessary with the format of "<|begin_of_query|> search query (only list keywords, such as **"keyword_1 keyword_2 ..."**)<|end_of_query|>". **A query must involve only a single triple**.
Then, the search system will provide the Assistant with the retrieval information with the format of "<|begin_of_documents|> ...search results... <|end_of_documents|>".

User:Who is older?
Assistant: <think>"""


def test_base_prompt_is_spec_text():
    assert prompts.base_prompt("Who is older?") == EXPECTED_BASE


def test_instruct_prompt_uses_chat_template(reference_dir):
    tokenizer = hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
    text = prompts.instruct_prompt("Who is older?", tokenizer)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\nGiven a question")
    assert "**you can perform searching for uncertain knowledge** if necessary" in text
    assert text.endswith("<|im_start|>user\nWho is older?<|im_end|>\n<|im_start|>assistant\n<think>")


def test_document_block_is_the_spec_insertion():
    block = prompts.documents_block(["Title: A Text:  a.", "Title: B Text:  b."])
    assert block == ("\n\n<|begin_of_documents|>\n(1)Title: A Text:  a.\n(2)Title: B Text:  b.\n"
                     "<|end_of_documents|>\n\n")
    assert prompts.documents_block([]) == (
        "\n\n<|begin_of_documents|>\nNone<|end_of_documents|>\n\n")
