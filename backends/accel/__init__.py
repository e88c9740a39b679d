"""The accelerator backend: the machine description (`config`), the ISA (`isa`), DRAM layouts
and the program container (`layout`), the codegen (`codegen`), the PyRTL hardware
(`hardware`) and its Verilog, testbench and synthesis flow (`verilog`)."""
