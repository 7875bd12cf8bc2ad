"""Sans-IO decisions: values in, verdicts out.

Addresses, IP groups, the user directory, passwords, the greeting delay,
trust, relay, recipients and VRFY.  Nothing here imports
``twisted.internet`` reactors or touches a socket; tests drive it with
plain values.
"""
