"""Who the device is: keys on the token, CSRs, fleet provisioning by claim, certificate rotation, the factory steps."""
