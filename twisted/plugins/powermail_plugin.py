"""The `twistd powermail` entry: a ServiceMaker naming the tap module."""

from twisted.application.service import ServiceMaker

powermail = ServiceMaker(
    "PowerMail", "powermail.tap", "PowerMail mail platform (MX, and more)", "powermail"
)
