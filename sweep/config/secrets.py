"""Keep secrets out of everything a sweep writes: logs, MLflow params/tags/artifacts, the results
folder. Two kinds: passwords inside store URIs (scheme://user:password@host) and the values of
credential environment variables (hub tokens and the like). Store URIs may reference the
environment as ${VAR}; they are expanded only where a connection is made, so files keep the
reference, never the value.
"""

from __future__ import annotations

import os
import re
import urllib.parse

SECRET_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HUGGINGFACEHUB_API_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "WANDB_API_KEY", "RAY_AUTH_TOKEN",
)  # fmt: skip
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^/\s:@]+:)(?P<password>[^@\s]+)(?P<tail>@)")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MASK = "***"


def expand_env(value: str) -> str:
    """${VAR} -> the variable's value; a missing variable is an error naming it. Inside a URI's
    user:password@ part the value is percent-encoded, so a password may hold any character."""
    userinfo = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*)@", value)
    start, end = userinfo.span(1) if userinfo else (-1, -1)

    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise KeyError(name)
        inside = start <= match.start() and match.end() <= end
        return urllib.parse.quote(os.environ[name], safe="") if inside else os.environ[name]

    return _ENV_REF.sub(one, value)


def redact(text: str) -> str:
    """The text with URI passwords and credential values replaced by ***."""
    if not text:
        return text
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + (m.group("password") if _ENV_REF.fullmatch(m.group("password")) else MASK) + m.group("tail"), text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, MASK)
    return text


# what lets a store's client connect without the password in its URL: PostgreSQL's libpq reads
# PGPASSWORD or ~/.pgpass, MLflow's client MLFLOW_TRACKING_PASSWORD
_PASSWORD_ELSEWHERE = {"postgresql": "PGPASSWORD", "http": "MLFLOW_TRACKING_PASSWORD", "https": "MLFLOW_TRACKING_PASSWORD"}


def masked(url: str) -> bool:
    """Whether a store URL's password is the mask redact() wrote: the real one is not in it."""
    match = _URI_PASSWORD.search(url or "")
    return bool(match) and match.group("password") == MASK


def password_variable(url: str) -> str | None:
    """The environment variable the client of this store URL reads its password from, if any."""
    return _PASSWORD_ELSEWHERE.get(url.split("://", 1)[0].split("+", 1)[0])


def unmasked(url: str) -> str | None:
    """A URL whose password was masked, with the password taken out where its client finds it
    elsewhere (the variable of _PASSWORD_ELSEWHERE is set, or ~/.pgpass exists); None otherwise.
    PostgreSQL keeps its user (libpq matches ~/.pgpass by it); MLflow takes its user from
    MLFLOW_TRACKING_USERNAME, so the whole user:password@ goes."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    variable = password_variable(url)
    if variable is None:
        return None
    pgpass = scheme == "postgresql" and os.path.isfile(os.environ.get("PGPASSFILE", os.path.expanduser("~/.pgpass")))
    if not (os.environ.get(variable) or pgpass):
        return None
    if scheme == "postgresql":
        return _URI_PASSWORD.sub(lambda m: m.group("head")[:-1] + m.group("tail"), url, count=1)
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1", url, count=1)


# Ray Tune copies these from the driver's environment into the runtime env of every trainable
# (ray.tune.execution.class_cache), which Ray's runtime-env agent then logs in clear text into its
# session folder (/tmp/ray/session_*/logs/runtime_env_agent.log, readable by every user). The
# workers need none of them (they write no artifacts); a local Ray's workers inherit the driver's
# environment anyway, and a cluster's nodes have their own.
SHIPPED_BY_TUNE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


class KeptFromTune:
    """`with KeptFromTune():` the variables Ray Tune would ship to its trainables are out of this
    process's environment inside (Tune reads them as it starts each worker), back as they were after."""

    def __enter__(self) -> "KeptFromTune":
        self.saved = {name: os.environ.pop(name) for name in SHIPPED_BY_TUNE if name in os.environ}
        return self

    def __exit__(self, *exc: object) -> None:
        os.environ.update(self.saved)
