"""The baselines the parameter server is measured against: torch DDP (fp32, fp16, PowerSGD)
and the 1-bit exchange as a DDP communication hook.
"""
