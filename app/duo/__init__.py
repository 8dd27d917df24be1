"""The Duo face: tapprove answering the Duo Auth API, so pam_duo, login_duo, duo_client and
the identity providers built on them can use tapprove by changing a host name and two keys.

Read it top to bottom:
- `signatures.py`, `params.py`, `replies.py`, `answers.py`: pure (no I/O): how a request is
  signed and read, how a reply is encoded (JSON, or BSON for the legacy `.bson` endpoints),
  and what each answer says, including when a status poll must answer.
- `integrations.py`: the integrations (relying parties with an ikey and a sealed skey) in SQL.
- `approvals.py`: the one module that calls the approval use cases (and the passcode and
  SMS-passcode checks, which start no approval).
- `enrollment.py`: `enroll` / `enroll_status` for integrations allowed to enroll: a
  first-device enrollment code in Duo's words.
- `routes.py`: the HTTP endpoints, `/auth/v2/*` and `/rest/v1/*.bson`.

docs/duo-compat.md is the user's view: supported endpoints, parameters and client setups.
"""
