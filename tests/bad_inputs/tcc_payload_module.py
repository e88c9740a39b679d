open('PICKLE_PAYLOAD_RAN', 'w').close()  # a payload: importing it runs code
