#!/usr/bin/python
"""Ansible module: the ssekit smoke test (one event across the public URL)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sse_probe
short_description: Publish one event through an ssehub deployment and wait for it on a stream
description:
  - Opens a Server-Sent Events stream through the public URL (the proxy), publishes a
    unique event with C(POST /publish/), and checks that it arrives within I(timeout).
  - Reports the publish-to-receive latency. On failure, C(hop) names the first hop that
    broke (dns, tcp, tls, proxy status, content type, buffering, publish, delivery) and
    C(msg) says why in one line.
  - Uses only the Python standard library on the host it runs on; the check is the same
    code as C(ssehub smoke).
  - Never changes anything (C(changed) is always false); runs in check mode too.
options:
  url:
    description: Public base URL of the hub, e.g. C(https://sse.example.org).
    type: str
    required: true
  token:
    description:
      - A token that may publish and subscribe to I(channel).
      - Give this or I(token_secret).
    type: str
  token_secret:
    description:
      - The hub's C(SSEHUB_TOKEN_SECRET); the module mints a 5-minute token for C(smoke.*).
    type: str
  channel:
    description: Channel to use; default C(smoke.<random>).
    type: str
  timeout:
    description: Seconds to wait for the connection and for the event.
    type: float
    default: 5.0
  connect_to:
    description:
      - C(HOST:PORT) (or C(HOST)) to connect to instead of the host in I(url), like curl's
        C(--connect-to). The Host header and the TLS server name stay those of I(url).
      - For a proxy behind a load balancer, a port forwarded to the controller, or a name
        that DNS does not serve yet.
    type: str
  validate_certs:
    description: Verify the TLS certificate. Set to false for a self-signed certificate.
    type: bool
    default: true
author:
  - ssekit
"""

EXAMPLES = r"""
- name: Check that an event crosses the proxy
  sse_probe:
    url: "https://{{ ssehub_public_host }}"
    token_secret: "{{ ssehub_token_secret }}"
    validate_certs: false
  delegate_to: localhost
  register: smoke

- name: Show the latency
  ansible.builtin.debug:
    msg: "event crossed the proxy in {{ smoke.latency_ms | round(1) }} ms"
"""

RETURN = r"""
latency_ms:
  description: Milliseconds from publishing the event to receiving it on the stream.
  returned: success
  type: float
  sample: 12.4
channel:
  description: The channel the probe used.
  returned: always
  type: str
  sample: smoke.3f9a1c2b7d4e
event_id:
  description: The id the hub gave the event.
  returned: success
  type: str
  sample: "1042"
hop:
  description: The first hop that broke, or null on success.
  returned: always
  type: str
  sample: buffering
msg:
  description: One readable line, "ok ..." or "FAILED at HOP ...".
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ssehub_probe import mint, probe  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "token": {"type": "str", "no_log": True},
            "token_secret": {"type": "str", "no_log": True},
            "channel": {"type": "str"},
            "timeout": {"type": "float", "default": 5.0},
            "connect_to": {"type": "str"},
            "validate_certs": {"type": "bool", "default": True},
        },
        required_one_of=[("token", "token_secret")],
        mutually_exclusive=[("token", "token_secret")],
        supports_check_mode=True,
    )
    params = module.params
    token = params["token"] or mint(params["token_secret"])
    result = probe(params["url"], token, channel=params["channel"], timeout=params["timeout"],
                   insecure=not params["validate_certs"], connect_to=params["connect_to"])
    output = {"changed": False, "latency_ms": result.latency_ms, "channel": result.channel,
              "event_id": result.event_id, "hop": result.hop}
    if result.ok:
        module.exit_json(msg=result.line(), **output)
    module.fail_json(msg=result.line(), **output)


if __name__ == "__main__":
    main()
