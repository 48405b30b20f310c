"""ssekit's test harness, one home per helper the tests share.

- ``servers``: real servers on loopback (Redis, PostgreSQL, nginx, Caddy, the
  hub under gunicorn as ``ServedHub``), each stopped by the PID it started;
- ``fixtures``: the pytest fixtures built on them (the session's Redis and
  PostgreSQL, the hub behind nginx as ``stack``, Caddy, ``proxy``), which a
  pytest configuration loads with ``-p ssekit_testing.fixtures``;
- ``tokens``: test tokens, minted as a user's backend mints them;
- ``sse``: an event stream parsed as a browser's EventSource parses it;
- ``roles``: a role's defaults, and its templates rendered with Ansible.

Installed editable into .venv by ``make venv`` (tests/support/pyproject.toml):
no test puts a directory on ``sys.path``.
"""
