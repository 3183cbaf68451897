"""A Python runtime's client for `tokenkeep serve`, standard library only.

    from tokenkeep_client import Tokenkeep
    keeper = Tokenkeep(socket="/run/user/1000/tokenkeep/api.sock", key=os.environ["TOKENKEEP_API_KEY"])
    token = keeper.access_token("github", "alice")          # valid, refreshed first if needed
    token = keeper.access_token("github", "alice", min_remaining=1800)
    keeper.store("github", "alice", provider_token_response) # after the OAuth dance

Every failure raises TokenkeepError with the documented class
(`reauthorization-required`, `provider-unavailable`, ...): a token that
cannot be refreshed is an exception, never a stale token.

Run as a script: python3 tokenkeep_client.py PROVIDER USER prints the
access token (TOKENKEEP_SOCKET or TOKENKEEP_URL, and TOKENKEEP_API_KEY).
"""

import http.client
import json
import os
import socket
import sys
import urllib.parse


class TokenkeepError(Exception):
    """A failed call: `error` is the documented class, `status` the HTTP status."""

    def __init__(self, status, error, message):
        super().__init__(f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Tokenkeep:
    """One service: a Unix socket path, or a loopback URL (http://127.0.0.1:PORT)."""

    def __init__(self, socket=None, url=None, key=None, timeout=60.0):
        if (socket is None) == (url is None):
            raise ValueError("give exactly one of socket and url")
        self._socket = socket
        self._url = urllib.parse.urlsplit(url) if url else None
        self._key = key
        # Longer than the keeper's lock wait: a caller may queue behind a refresh.
        self._timeout = timeout

    def _connection(self):
        if self._socket is not None:
            return _UnixConnection(self._socket, self._timeout)
        return http.client.HTTPConnection(self._url.hostname, self._url.port, timeout=self._timeout)

    def _call(self, method, path, body=None):
        conn = self._connection()
        try:
            headers = {"Authorization": f"Bearer {self._key}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.status == 204:
            return None
        answer = json.loads(raw) if raw else {}
        if response.status >= 400:
            raise TokenkeepError(response.status, answer.get("error", "unknown"), answer.get("message", ""))
        return answer

    @staticmethod
    def _row(provider, user_id):
        q = urllib.parse.quote
        return f"/v1/tokens/{q(provider, safe='')}/{q(user_id, safe='')}"

    def access_token(self, provider, user_id, min_remaining=None):
        """A valid access token (a str), refreshed first when needed."""
        return self.grant(provider, user_id, min_remaining)["access_token"]

    def grant(self, provider, user_id, min_remaining=None):
        """The access grant: access_token, expires_at, scopes, generation."""
        path = self._row(provider, user_id) + "/access-token"
        if min_remaining is not None:
            path += f"?min_remaining={int(min_remaining)}"
        return self._call("GET", path)

    def store(self, provider, user_id, token_response):
        """Stores a provider's token response (RFC 6749 section 5.1 JSON)."""
        return self._call("PUT", self._row(provider, user_id), token_response)

    def state(self, provider, user_id):
        """The token's state, without secrets."""
        return self._call("GET", self._row(provider, user_id))

    def delete(self, provider, user_id):
        self._call("DELETE", self._row(provider, user_id))

    def tokens(self, page_size=100):
        """Every token state the key may reach, page by page."""
        query = {"limit": page_size}
        while True:
            page = self._call("GET", "/v1/tokens?" + urllib.parse.urlencode(query))
            yield from page["tokens"]
            if page["next"] is None:
                return
            query.update(page["next"])


def main(argv):
    if len(argv) != 3:
        print("usage: tokenkeep_client.py PROVIDER USER", file=sys.stderr)
        return 2
    keeper = Tokenkeep(
        socket=os.environ.get("TOKENKEEP_SOCKET"),
        url=os.environ.get("TOKENKEEP_URL"),
        key=os.environ["TOKENKEEP_API_KEY"],
    )
    try:
        print(keeper.access_token(argv[1], argv[2]))
    except TokenkeepError as e:
        print(f"tokenkeep: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
