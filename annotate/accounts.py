"""Accounts of the review app and the user study: argon2 password hashes, roles, enabling and disabling.

Every login and account change goes through here; the CLI (`mcie users ...`) and the web app call these functions.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.db.models import AuditLog, Role, User

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,63}$")
MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def check_username(username: str) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise AccountError(
            f"invalid username {username!r}: expected 2-64 characters, lower-case letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return username


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AccountError(f"unknown role {role!r}: expected one of {', '.join(r.value for r in Role)}") from None


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user named {username!r}")
    return user


def create_user(
    session: Session,
    username: str,
    role: str | Role,
    password: str | None,
    *,
    display_name: str | None = None,
    actor_id: int | None = None,
) -> User:
    """Add an account; participants may have no password (they join by invite link)."""
    check_username(username)
    role = parse_role(role) if isinstance(role, str) else role
    if password is None and role is not Role.participant:
        raise AccountError(f"a {role.value} needs a password")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise AccountError(f"a user named {username!r} already exists")
    user = User(
        username=username,
        role=role,
        display_name=display_name,
        password_hash=hash_password(password) if password is not None else None,
        active=True,
    )
    session.add(user)
    session.flush()
    session.add(AuditLog(user_id=actor_id, action="user.create", entity="user", entity_id=str(user.id),
                         details={"username": username, "role": role.value}))
    return user


def set_password(session: Session, username: str, password: str, *, actor_id: int | None = None) -> int:
    """Change the password and end every session of the account; returns how many sessions were ended."""
    user = get_user(session, username)
    user.password_hash = hash_password(password)
    ended = revoke_sessions(session, username, reason="password changed", actor_id=actor_id)
    session.add(AuditLog(user_id=actor_id, action="user.set_password", entity="user", entity_id=str(user.id)))
    return ended


def set_active(session: Session, username: str, active: bool, *, actor_id: int | None = None) -> int:
    """Enable or disable the account; disabling ends every session of it. Returns how many sessions were ended."""
    user = get_user(session, username)
    user.active = active
    ended = 0 if active else revoke_sessions(session, username, reason="account disabled", actor_id=actor_id)
    action = "user.enable" if active else "user.disable"
    session.add(AuditLog(user_id=actor_id, action=action, entity="user", entity_id=str(user.id)))
    return ended


def revoke_sessions(session: Session, username: str, *, reason: str = "revoked", actor_id: int | None = None) -> int:
    """End every live web session of the account at once (every replica refuses them on the next request)."""
    from mcie.annotate import sessions

    user = get_user(session, username)
    ended = sessions.revoke_user(session, user.id, reason)
    if ended:
        session.add(AuditLog(user_id=actor_id, action="user.sessions_revoked", entity="user", entity_id=str(user.id),
                             details={"sessions": ended, "reason": reason}))
    return ended


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this username and password, or None (the same answer for every kind of failure)."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active or not user.password_hash:
        _hasher.hash("timing-equaliser")  # spend the same time whether or not the user exists
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = datetime.now(UTC)
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.role, User.username)))
