"""The approval: what a sign-in (or a relying party) asks a user's phone to confirm. This
package is the only code that reads or changes approval state. Read it top to bottom:

- `model`    the approval itself (PendingApproval, Status, its flat hash form, its id);
- `rules`    pure rules: what an answer decides, deadlines, push-fatigue backoff, browser
             binding, how long an end stays readable;
- `errors`   why a use case refuses, in domain words (the HTTP and socket layers map them);
- `keys`     every Redis key and channel name of an approval;
- `store`    ApprovalStore, the only module that touches those keys: one script
             (`scripts/*.lua`) or one read per method;
- `waiters`  hearing of an approval's end through this process's inbox;
- the use cases: `start` (create and send one), `answer` (a device's signed decision),
  `login` (the browser's side: status, resend, SMS code, completion) and `waiting` (long
  polls, the browser's stream, the expiry sweeper).

Delivery (app.delivery) is below the use cases: it reads and records through the store.
"""
