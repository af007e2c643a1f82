"""The lab: experiments that test batch norm's claims on real data, and the report."""
