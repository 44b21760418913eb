"""`heartloop user ...` — review UI accounts from the command line (the first admin is made here).

Passwords are read with getpass (asked twice) or, with ``--password-stdin``, as one line from
standard input (for scripts); they are stored as salted scrypt hashes and never printed or logged.
Every change is written to the audit log with the actor ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from heartloop.review_ui.security import MIN_PASSWORD_CHARS, hash_password
from heartloop.store.people import ROLES

log = logging.getLogger(__name__)


def _actor() -> str:
    try:
        who = getpass.getuser()
    except Exception:  # no login name in a container: still say it came from the command line
        who = "unknown"
    return f"cli:{who}"[:64]


def _read_password(args: argparse.Namespace) -> str:
    """The new password: one line of stdin with --password-stdin, else asked twice on the terminal."""
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise ValueError("no terminal to ask for the password: pass --password-stdin and send it on stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise ValueError("the two passwords differ; nothing changed")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_CHARS} characters; nothing changed")
    return password


def _with_store(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any],
                work: Callable[[Any], int]) -> int:
    from heartloop.store import Store

    store = Store.from_settings(settings_of(args))
    try:
        return work(store)
    finally:
        store.dispose()


def cmd_user_add(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any]) -> int:
    password_hash = hash_password(_read_password(args))

    def work(store: Any) -> int:
        store.add_user(args.name, password_hash, args.role, args.display_name or "")
        store.append_audit(_actor(), "user_create", f"user:{args.name}",
                           {"role": args.role, "display_name": args.display_name or "", "via": "cli"})
        print(f"user {args.name} added ({args.role})")
        return 0

    return _with_store(args, settings_of, work)


def cmd_user_list(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any]) -> int:
    def work(store: Any) -> int:
        users = store.list_users()
        if not users:
            print("no users yet: heartloop user add NAME --role admin")
            return 0
        print(f"{'user':<20} {'role':<9} {'active':<7} {'created (UTC)':<19}  display name")
        for u in users:
            created = datetime.fromtimestamp(u.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{u.username:<20} {u.role:<9} {'yes' if u.active else 'no':<7} {created:<19}  {u.display_name}")
        return 0

    return _with_store(args, settings_of, work)


def cmd_user_passwd(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any]) -> int:
    def work(store: Any) -> int:
        if store.get_user(args.name) is None:
            raise ValueError(f"no user {args.name!r}")
        store.update_user(args.name, password_hash=hash_password(_read_password(args)))
        store.append_audit(_actor(), "user_change", f"user:{args.name}", {"changed": ["password"], "via": "cli"})
        print(f"password of {args.name} changed (their open sessions end)")
        return 0

    return _with_store(args, settings_of, work)


def cmd_user_disable(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any]) -> int:
    def work(store: Any) -> int:
        if store.get_user(args.name) is None:
            raise ValueError(f"no user {args.name!r}")
        store.update_user(args.name, active=False)
        store.append_audit(_actor(), "user_change", f"user:{args.name}",
                           {"changed": ["active"], "active": False, "via": "cli"})
        print(f"user {args.name} disabled (their open sessions end)")
        return 0

    return _with_store(args, settings_of, work)


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None],
             settings_of: Callable[[argparse.Namespace], Any]) -> None:
    """Add ``heartloop user {add,list,passwd,disable}`` to the CLI's subparsers.

    Parameters
    ----------
    sub
        The main parser's subparsers action.
    common
        Adds ``--config`` and ``--data-dir`` to a subparser.
    settings_of
        Builds the validated settings from parsed arguments (the CLI's own helper).
    """
    user = sub.add_parser("user", help="review UI accounts: add, list, passwd, disable",
                          description="Manage the people who may log in to the review UI. Roles: reviewer "
                                      "(dosimetrist); admin (physicist: also users, model rollback, settings).")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="SUBCOMMAND")

    def bind(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[[argparse.Namespace], int]:
        return lambda args: fn(args, settings_of)

    sp = user_sub.add_parser("add", help="create a user (asks for the password twice)")
    common(sp)
    sp.add_argument("name", help="login name: letters, digits, '.', '_' or '-'")
    sp.add_argument("--role", required=True, choices=ROLES)
    sp.add_argument("--display-name", default="", metavar="'Family^Given'",
                    help="person name recorded in DICOM outputs (default: the login name)")
    sp.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    sp.set_defaults(func=bind(cmd_user_add))

    sp = user_sub.add_parser("list", help="list users with role and whether they are active")
    common(sp)
    sp.set_defaults(func=bind(cmd_user_list))

    sp = user_sub.add_parser("passwd", help="set a new password (ends the user's open sessions)")
    common(sp)
    sp.add_argument("name")
    sp.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    sp.set_defaults(func=bind(cmd_user_passwd))

    sp = user_sub.add_parser("disable", help="stop a user from logging in (ends their open sessions)")
    common(sp)
    sp.add_argument("name")
    sp.set_defaults(func=bind(cmd_user_disable))
