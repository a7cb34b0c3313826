"""AWS IoT Jobs: one job at a time, every document checked before it is acted on; other capabilities contribute
handlers by operation name.
"""
