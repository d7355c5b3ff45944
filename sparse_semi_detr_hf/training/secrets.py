"""Keep credentials out of everything a run writes (model cards, results.json, tracker configs, logs).

Three rules, applied to every settings dict before it leaves the process:

- a setting whose *name* looks secret (``*token*``, ``*secret*``, ``*password*``, ``*api_key*``) is replaced by
  ``"<HUB_TOKEN>"``-style placeholders (transformers' ``TrainingArguments.to_dict`` convention) when set;
- in any string value, credentials embedded in URLs (``https://user:pass@host``, ``?token=...``), strings shaped
  like Hugging Face tokens (``hf_...``) and the values of known secrets (``--hub_token``, ``HF_TOKEN``) are masked;
- for a *public* model card, local filesystem paths are dropped as well (:func:`public_settings`).
"""

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "<redacted>"
SECRET_NAME = re.compile(r"token|secret|password|passwd|api_key|apikey|credential", re.IGNORECASE)
# huggingface_hub user access tokens: "hf_" + 30+ letters/digits (older "api_" org tokens too).
HF_TOKEN_SHAPE = re.compile(r"\b(?:hf|api)_[A-Za-z0-9]{20,}\b")
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
URL_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[^=&\s]*(?:token|secret|password|key|sig|signature|credential)[^=&\s]*)=)[^&\s#]*",
    re.IGNORECASE,
)
# Environment variables whose values are credentials a run may see (read by huggingface_hub and trackers).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY")
MIN_SECRET_LENGTH = 4  # shorter "secrets" would mask ordinary words and digits


def known_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    """The secret values of this process: ``extra`` (e.g. ``--hub_token``) and the secret environment variables."""
    values = [*extra, *(os.environ.get(name) for name in SECRET_ENV_VARS)]
    return sorted({v for v in values if v and len(v) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secret values, token-shaped strings and URL credentials masked."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = HF_TOKEN_SHAPE.sub(MASK, text)
    text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return URL_SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """Strings redacted with :func:`redact_text`; dicts, lists and tuples recursively (secret-named keys masked)."""
    secrets = list(secrets)
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return redact_settings(value, secrets)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    return value


def redact_settings(settings: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``settings`` with secret-named entries replaced by ``"<NAME>"`` (``None`` stays ``None``) and
    every other value passed through :func:`redact`."""
    secrets = known_secrets([*secrets, *(v for k, v in settings.items() if SECRET_NAME.search(str(k))
                                         and isinstance(v, str))])
    return {
        key: (None if value is None else f"<{str(key).upper()}>") if SECRET_NAME.search(str(key))
        else redact(value, secrets)
        for key, value in settings.items()
    }


def looks_like_local_path(value: Any) -> bool:
    """True for strings that name something on this machine: absolute, home- or dot-relative paths, or a relative
    path with a separator that exists here (``outputs/run``; a Hub id ``user/name`` that is not a local folder is
    not one)."""
    if not isinstance(value, str) or not value:
        return False
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    return ("/" in value or os.sep in value) and os.path.exists(value)


def public_settings(settings: Mapping[str, Any], secrets: Iterable[str] = (),
                    path_names: Iterable[str] = ()) -> dict[str, Any]:
    """Settings fit for a public model card: :func:`redact_settings`, then secret-named entries, the entries
    named in ``path_names``, other values that look like local paths, and ``None`` values left out."""
    redacted, path_names = redact_settings(settings, secrets), set(path_names)
    return {
        key: value for key, value in redacted.items()
        if value is not None and not SECRET_NAME.search(str(key)) and key not in path_names
        and not looks_like_local_path(settings[key])
    }
