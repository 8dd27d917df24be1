"""Building the provider adapters this deployment has configured (app.delivery.push is the
seam they implement)."""

from __future__ import annotations

from app.delivery.apns import ApnsSender
from app.delivery.fcm import FcmSender
from app.delivery.push import Providers, SmsSender
from app.delivery.sms import LogSms, TwilioSms
from app.delivery.webpush import WebPushSender
from app.settings import Settings


async def build_providers(settings: Settings) -> Providers:
    """Build the adapters whose settings are present; the rest stay None.

    FCM needs TAPPROVE_FCM_CREDENTIALS (project id from the setting or the file); APNs the
    key file, key id, team id and topic; SMS the Twilio account sid, auth token and sender.
    A provider with only some of its settings raises ValueError (fail at startup).

    SMS is never None here: without Twilio settings it goes to the log (`LogSms`), as mail
    does without SMTP, so the embedded default can still verify phones and show the SMS
    fallback; the operator reads the codes from the log. Web Push is never None either: it
    needs no account anywhere, only the VAPID key, which is generated when not configured.
    """
    sms: SmsSender = (
        TwilioSms.from_settings(settings) if TwilioSms.configured(settings) else LogSms()
    )
    return Providers(
        fcm=FcmSender.from_settings(settings) if FcmSender.configured(settings) else None,
        apns=ApnsSender.from_settings(settings) if ApnsSender.configured(settings) else None,
        sms=sms,
        webpush=WebPushSender.from_settings(settings),
    )
