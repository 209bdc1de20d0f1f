"""Configuration of every mcie command: one typed settings object, read once at start.

Values come, highest priority first, from keyword arguments, ``MCIE_*`` environment variables, a
``.env`` file, the TOML file named by ``MCIE_CONFIG`` (default ``./mcie.toml`` when it exists), and the
defaults below. A bad value fails at start with :class:`ConfigError`, which names the setting (as its
environment variable) and says what was expected.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "MCIE_"
SECRET_FIELDS = ("mllm_api_key", "secret_key", "blob_storage_options")


# a weights setting: a local path or a Hugging Face Hub id ``owner/name[@revision]``, resolved by mcie.hub
WeightsRef = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


class ConfigError(ValueError):
    """A setting has a value mcie cannot use; the message names it and what was expected."""


def _config_file() -> Path:
    return Path(os.environ.get("MCIE_CONFIG", "mcie.toml"))


class Settings(BaseSettings):
    """Every setting mcie reads. Field ``foo_bar`` is ``MCIE_FOO_BAR`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
    )

    # --- storage -------------------------------------------------------------------------------------
    database_url: str = Field(
        "",
        description="SQLAlchemy URL: sqlite:///PATH (embedded; default sqlite:///<data_dir>/mcie.db, i.e. "
        "sqlite:///./data/mcie.db) or postgresql+psycopg://USER@HOST/DB.",
    )
    data_dir: Path = Field(Path("./data"), description="Folder for the SQLite database, blobs and caches.")
    blob_url: str | None = Field(
        None, description="fsspec URL of the image store; default <data_dir>/blobs (s3://bucket/x works too)."
    )
    blob_storage_options: SecretStr | None = Field(
        None, description="JSON object passed to fsspec for the image store (credentials, endpoint)."
    )
    max_image_pixels: int = Field(64_000_000, ge=1, description="Largest image accepted (width x height).")
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest image file accepted, in bytes.")
    thumbnail_size: int = Field(384, ge=16, le=4096, description="Longest side of cached WebP thumbnails.")

    # --- web app ---------------------------------------------------------------------------------------
    secret_key: SecretStr | None = Field(
        None, description="Key that signs the pre-login cookie; generated into <data_dir>/secret_key if unset."
    )
    public_url: str | None = Field(
        None, description="The URL users open (https://review.example.org). An http:// URL turns Secure cookies off; "
        "unset, cookies are Secure unless the app is served on a loopback address."
    )
    trusted_proxies: str = Field(
        "", description="Comma-separated IPs or CIDR networks of reverse proxies whose X-Forwarded-For is believed "
        "(default: none, the direct peer is the client)."
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins (https://host) allowed to call the app from other sites with "
        "credentials; default none (same origin only)."
    )
    session_idle_timeout_s: int = Field(4 * 3600, ge=60, description="A session unused this long ends (seconds).")
    session_max_age_s: int = Field(12 * 3600, ge=60, description="A session ends this long after login (seconds).")
    session_touch_interval_s: int = Field(
        60, ge=1, description="How often a session's last-seen time is written (seconds; not on every request)."
    )
    login_free_failures: int = Field(
        3, ge=1, description="Failed logins per (username, client IP) before each further one is delayed."
    )
    login_delay_base_s: float = Field(2.0, gt=0, description="First delay after the free failures; it doubles.")
    login_max_delay_s: float = Field(900.0, gt=0, description="Longest delay between two login tries (seconds).")
    login_failure_window_s: float = Field(
        3600.0, gt=0, description="Failures older than this (since the last one) are forgotten (seconds)."
    )
    login_ip_max_failures: int = Field(
        50, ge=1, description="Failed logins from one IP over all usernames before that IP is blocked."
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body the web app reads (bytes); larger gets 413."
    )

    # --- ingest limits --------------------------------------------------------------------------------
    max_instruction_chars: int = Field(
        4000, ge=1, description="Longest turn instruction accepted at ingest (each becomes a sub-instruction; a "
        "sample's instruction joins those of its turns)."
    )
    max_meta_bytes: int = Field(65536, ge=2, description="Largest `meta` object (as JSON) accepted at ingest.")

    # --- job queue ---------------------------------------------------------------------------------------
    job_lease_s: float = Field(
        60.0, gt=1, description="How long a worker holds a job without renewing (a dead worker's job waits this)."
    )
    job_max_attempts: int = Field(3, ge=1, le=100, description="Tries of a job before it fails for good.")

    # --- MLLM used by the pipeline (filter, grounding, decomposition, judging) --------------------------
    mllm_backend: Literal["none", "openai", "vllm", "transformers"] = Field(
        "none", description="Which MLLM backend the pipeline uses."
    )
    mllm_base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="Base URL of an OpenAI-compatible server (vllm serve)."
    )
    mllm_model: str = Field("Qwen/Qwen2.5-VL-72B-Instruct", description="Model name sent to the server.")
    mllm_model_path: WeightsRef | None = Field(
        None, description="Model of the in-process vllm/transformers backends: a local folder or a Hub id "
        "(Qwen/Qwen2.5-VL-7B-Instruct[@revision])."
    )
    mllm_api_key: SecretStr | None = Field(None, description="API key for the OpenAI-compatible server.")
    mllm_concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight to the MLLM server.")
    mllm_timeout_s: float = Field(180.0, gt=0, description="Timeout of one MLLM request, in seconds.")
    mllm_max_retries: int = Field(4, ge=0, le=20, description="Retries of a failed MLLM request.")

    # --- CLIP used for box selection (Eq. 1) and evaluation ----------------------------------------------
    clip_model: str = Field("ViT-L-14", description="open_clip architecture name.")
    clip_checkpoint: WeightsRef | None = Field(
        None, description="open_clip checkpoint: a file or folder, a Hub id ([hf-hub:]owner/name[@revision]) or a "
        "pretrained tag of MCIE_CLIP_MODEL (e.g. openai); without it box selection uses the pixel scorer."
    )

    # --- MCIE-E1 editing model -------------------------------------------------------------------------
    editing_base_model_path: WeightsRef | None = Field(
        None, description="InstructPix2Pix (SD 1.5, diffusers layout) the model is built on: a local folder or a Hub "
        "id (timbrooks/instruct-pix2pix[@revision])."
    )
    editing_weights_path: WeightsRef | None = Field(
        None, description="Trained MCIE-E1 parts (LoRA + SACA + BCCA safetensors): a local folder or a Hub id."
    )
    editing_vision_checkpoint: WeightsRef | None = Field(
        None, description="open_clip vision checkpoint for BCCA (file, folder, Hub id or pretrained tag; default: "
        "the one named in the weights' config)."
    )
    dino_checkpoint: WeightsRef | None = Field(
        None, description="DINOv2 (transformers layout) for the DINO-I metric of `mcie eval`: a local folder or a "
        "Hub id (facebook/dinov2-base[@revision])."
    )
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:1 ...")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        path = _config_file()
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        elif "MCIE_CONFIG" in os.environ:
            raise ConfigError(f"MCIE_CONFIG: expected a readable TOML file, but {path} does not exist")
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url

        if value == "":
            return value  # filled in from data_dir below
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL ({exc})") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"the database must be sqlite or postgresql, not {url.get_backend_name()!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        import ipaddress

        for item in _split(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        for item in _split(value):
            if not item.startswith(("http://", "https://")) or item.count("/") != 2:
                raise ValueError(f"{item!r} is not an origin (scheme://host[:port], no path)")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/") if value else None

    @field_validator("mllm_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        if self.database_url == "":
            self.database_url = f"sqlite:///{self.data_dir.as_posix()}/mcie.db"
            if not self.data_dir.is_absolute() and not self.data_dir.as_posix().startswith("."):
                self.database_url = f"sqlite:///./{self.data_dir.as_posix()}/mcie.db"
        if self.blob_url is None:
            self.blob_url = str((self.data_dir / "blobs").resolve())
        return self

    # --- derived values ----------------------------------------------------------------------------------
    def trusted_proxy_list(self) -> list[str]:
        return _split(self.trusted_proxies)

    def cors_origin_list(self) -> list[str]:
        return [origin.rstrip("/") for origin in _split(self.cors_origins)]

    def storage_options(self) -> dict[str, Any]:
        import json

        if self.blob_storage_options is None:
            return {}
        try:
            options = json.loads(self.blob_storage_options.get_secret_value())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"MCIE_BLOB_STORAGE_OPTIONS: expected a JSON object ({exc})") from None
        if not isinstance(options, dict):
            raise ConfigError("MCIE_BLOB_STORAGE_OPTIONS: expected a JSON object")
        return options

    def shown(self) -> dict[str, str]:
        """The effective values as text, secrets masked, keyed by environment variable name."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                text = ""
            elif name in SECRET_FIELDS or isinstance(value, SecretStr):
                text = "********"
            elif name == "database_url" or name == "blob_url":
                text = _mask_url_password(str(value))
            else:
                text = str(value)
            out[ENV_PREFIX + name.upper()] = text
        return out


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _mask_url_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.password:
        return parsed.render_as_string(hide_password=True)
    return url


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "settings"
        name = ENV_PREFIX + field.upper()
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a known setting (see `mcie config show` for the list)"
        lines.append(f"{name}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one readable :class:`ConfigError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once). Tests call ``get_settings.cache_clear()`` after changing env."""
    return load_settings()


def settings_or_exit() -> Settings:
    """The settings for a command: on an invalid value, the reason on stderr and exit status 2 (every ``cli.py`` of
    every package uses this, so none of them imports the ``mcie`` command tree)."""
    try:
        return get_settings()
    except ConfigError as exc:
        import typer
        from rich.console import Console

        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
