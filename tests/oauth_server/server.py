"""Single-file django-oauth-toolkit (DOT) authorization server for tokenkeep's integration tests.

Usage: VENV/bin/python server.py --dir DIR [--port 0] [--users 1] [--access-token-seconds 3600]

Prints ONE JSON line on stdout (token_url, client credentials, a seeded access/refresh token
pair per user), then serves /o/token/ on 127.0.0.1 until SIGTERM or until stdin hits EOF
(so a test process that dies never leaves the server behind).
"""

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import uuid
from datetime import timedelta

import django
from django.conf import settings


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="writable directory for the sqlite db")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--access-token-seconds", type=int, default=3600)
    p.add_argument("--no-stdin-watch", action="store_true", help="for manual runs: ignore stdin EOF")
    return p.parse_args()


def configure(args):
    os.makedirs(args.dir, exist_ok=True)
    db = os.path.join(args.dir, "oauth.sqlite3")
    for suffix in ("", "-journal", "-wal", "-shm"):  # every run starts from a fresh db
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    settings.configure(
        DEBUG=False,
        SECRET_KEY=secrets.token_urlsafe(32),
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "oauth2_provider"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": db,
                # Request threads write concurrently: wait for the lock instead of failing, and
                # take it at BEGIN so a read->write upgrade can't deadlock into "database is locked".
                "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
            }
        },
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
        # DOT hashes client secrets with the first hasher. Django's default PBKDF2 costs ~0.3 s
        # of CPU per client authentication; a cheap hasher keeps the same hash+verify code path
        # without throttling the tests.
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        OAUTH2_PROVIDER={
            "ROTATE_REFRESH_TOKEN": True,
            "REFRESH_TOKEN_REUSE_PROTECTION": True,  # replaying a spent token revokes its family
            "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
            "ACCESS_TOKEN_EXPIRE_SECONDS": args.access_token_seconds,
            "SCOPES": {"read": "Reading scope", "write": "Writing scope"},
        },
    )
    django.setup()


def seed(args):
    from django.contrib.auth.models import User
    from django.utils import timezone
    from oauth2_provider.models import AccessToken, Application, RefreshToken, set_token_value

    client_id, client_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    # client_secret is hashed on save; the plaintext is only kept to print it.
    app = Application.objects.create(
        name="tokenkeep-tests",
        client_id=client_id,
        client_secret=client_secret,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris="http://127.0.0.1/callback",
    )
    tokens = []
    for i in range(args.users):
        user = User.objects.create_user(f"user{i}")  # no password: users never log in
        at = AccessToken(user=user, application=app, scope="read write",
                         expires=timezone.now() - timedelta(seconds=1))  # expired: forces a refresh
        set_token_value(at, secrets.token_urlsafe(30))
        at.save()
        # token_family must be set by hand: DOT only sets it when *it* issues a token, and
        # reuse protection silently does nothing for a family of None (rotation copies it).
        rt = RefreshToken(user=user, application=app, access_token=at, token_family=uuid.uuid4())
        set_token_value(rt, secrets.token_urlsafe(30))
        rt.save()
        tokens.append({"user": user.username, "access_token": at.token,
                       "refresh_token": rt.token, "scope": at.scope})
    return client_id, client_secret, tokens


def main():
    args = parse_args()
    configure(args)

    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application
    from django.urls import include, path

    global urlpatterns  # ROOT_URLCONF is this module; read lazily on the first request
    urlpatterns = [path("o/", include("oauth2_provider.urls", namespace="oauth2_provider"))]

    call_command("migrate", verbosity=0, stdout=sys.stderr)  # stdout is reserved for the JSON line
    client_id, client_secret, tokens = seed(args)

    # Django's threaded wsgiref server: one thread per connection, db connections closed after
    # each request. Its request log (method, path, status; never bodies) goes to stderr.
    server = ThreadedWSGIServer(("127.0.0.1", args.port), WSGIRequestHandler)
    server.set_app(get_wsgi_application())

    # os._exit, not sys.exit: every write is already committed, and a normal interpreter
    # shutdown aborts ("could not acquire lock for <stdin>") while the watcher below reads.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if not args.no_stdin_watch:
        def watch_stdin():
            try:
                while os.read(0, 65536):
                    pass
            except OSError:  # no stdin at all counts as EOF too
                pass
            os._exit(0)

        threading.Thread(target=watch_stdin, daemon=True).start()

    print(json.dumps({
        "token_url": f"http://127.0.0.1:{server.server_port}/o/token/",
        "client_id": client_id,
        "client_secret": client_secret,
        "tokens": tokens,
    }), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
