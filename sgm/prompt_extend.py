"""Prompt extension: an OpenAI-compatible chat model rewrites a short prompt into a detailed one.

    prompt_extend:
      base_url: http://localhost:11434/v1     # vLLM, Ollama, LM Studio, or an API provider
      model: qwen2.5:7b-instruct
      api_key_env: OPENAI_API_KEY             # the key is read from this variable (may be unset locally)

The seed's advice for Kaleido ("polish the prompt with a large language model") and Wan2.1's
``--use_prompt_extend`` made into a sampling option. The system prompt is written for
multi-subject references: the model never sees the images, so it is told how many there are and
asked to keep each referenced subject in the role the user gave it, to add no new subjects, and to
describe motion, setting and camera within a target length. Any failure (connection, timeout,
HTTP error, an empty or malformed reply) gives the original prompt back with one warning line:
extension is never a reason for a video to fail.

The ``openai`` client does the HTTP (retries off: the timeout is the whole budget).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """\
You rewrite prompts for a text-to-video model that also receives {references} reference image(s) \
of the subjects to show (people, animals, objects or places). You cannot see the images. \
The user's prompt refers to the referenced subjects (by name, by role such as "the man" or \
"the dog", or as the first, second, ... subject, in the order of the images); the video model \
makes them look like their references.
Rewrite the prompt into one paragraph of about {words} words:
- keep every referenced subject, in the role and with the action the user gave it; refer to each \
by the user's words; add no new main subjects and do not invent their appearance \
(face, clothes, colours), which comes from the references;
- keep the user's intent; add concrete motion, interaction, setting, lighting and camera work;
- present tense, plain description, no lists, no quotation marks, no preface.
Reply with the rewritten prompt only."""


@dataclass
class PromptExtendConfig:
    """An OpenAI-compatible chat endpoint that extends prompts; off while ``base_url`` is empty."""

    base_url: str = ""  # e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama)
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key's environment variable; unset: a placeholder key
    timeout: float = 30.0  # seconds for the whole request
    words: int = 80  # target length of the extended prompt
    temperature: float = 0.7
    system_prompt: str = ""  # empty: SYSTEM_PROMPT ({references} and {words} are filled in)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


def check_prompt_extend(config: PromptExtendConfig) -> None:
    """Raise ``ValueError`` naming the key of a prompt_extend setting that cannot work."""
    if not config.enabled:
        return
    if not config.base_url.startswith(("http://", "https://")):
        raise ValueError(f"prompt_extend.base_url: expected an http(s):// address, got '{config.base_url}'")
    if not config.model:
        raise ValueError("prompt_extend.model: expected the endpoint's model name (prompt_extend.base_url is set)")
    if not (math.isfinite(config.timeout) and config.timeout > 0):
        raise ValueError(f"prompt_extend.timeout: expected seconds above 0, got {config.timeout}")
    if config.words < 1:
        raise ValueError(f"prompt_extend.words: expected 1 or more, got {config.words}")


def system_message(config: PromptExtendConfig, references: int) -> str:
    template = config.system_prompt or SYSTEM_PROMPT
    return template.replace("{references}", str(references)).replace("{words}", str(config.words))


def clean_reply(text: object) -> str:
    """The prompt in a reply: stripped of whitespace and of quotes around the whole; ``ValueError``
    for a reply that is not text or is empty."""
    if not isinstance(text, str):
        raise ValueError(f"the reply's content is {type(text).__name__}, not text")
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise ValueError("the reply is empty")
    return text


def extend_prompt(prompt: str, *, references: int, config: PromptExtendConfig) -> str:
    """The extended prompt, or ``prompt`` itself (with one warning line) when anything fails."""
    if not config.enabled or not prompt.strip():
        return prompt
    import openai

    client = openai.OpenAI(
        base_url=config.base_url,
        api_key=os.environ.get(config.api_key_env) or "not-needed",  # local servers take any key
        timeout=config.timeout,
        max_retries=0,
    )
    try:
        reply = client.chat.completions.create(
            model=config.model,
            messages=[
                {"role": "system", "content": system_message(config, references)},
                {"role": "user", "content": prompt},
            ],
            temperature=config.temperature,
        )
        extended = clean_reply(reply.choices[0].message.content)
    except openai.APITimeoutError:
        log.warning(
            "prompt_extend: no reply from %s within %g s; using the original prompt", config.base_url, config.timeout
        )
        return prompt
    except openai.APIStatusError as exc:
        log.warning("prompt_extend: %s answered HTTP %d; using the original prompt", config.base_url, exc.status_code)
        return prompt
    except openai.APIConnectionError as exc:
        log.warning(
            "prompt_extend: cannot reach %s (%s); using the original prompt", config.base_url, exc.__cause__ or exc
        )
        return prompt
    except (openai.APIError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        log.warning("prompt_extend: malformed reply from %s (%s); using the original prompt", config.base_url, exc)
        return prompt
    finally:
        client.close()
    log.info("prompt_extend: %r -> %r", prompt, extended)
    return extended
