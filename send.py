import base64, hashlib, hmac, json, sys, time, http.client
port=int(sys.argv[1]); mode=sys.argv[2]
secret='s3cr3t-ü'
body=json.dumps([{"id":"a","sequence":1,"event":"E","secret":secret,"timestamp":1,"data":{}},{"id":"b","sequence":2,"event":"E","secret":secret,"timestamp":1,"data":{"x":1}}]).encode()
ts=str(int(time.time()) - (400 if mode=='stale' else 0))
sig="v1,"+base64.b64encode(hmac.new(b"secretkey", b"mid."+ts.encode()+b"."+body, hashlib.sha256).digest()).decode()
headers={"Authorization": ("Bearer "+secret).encode().decode('latin1'), "webhook-id":"mid","webhook-timestamp":ts,"webhook-signature":"v1,bogus "+sig}
if mode=='badauth': headers["Authorization"]="Bearer nope"
if mode=='noauth': del headers["Authorization"]
if mode=='badsig': headers["webhook-signature"]="v1,AAAA"
if mode=='garbage':
    body=b"not json"; headers["webhook-signature"]="v1,"+base64.b64encode(hmac.new(b"secretkey", b"mid."+ts.encode()+b"."+body, hashlib.sha256).digest()).decode()
c=http.client.HTTPConnection("127.0.0.1",port); c.request("POST","/hook",body=body,headers=headers); r=c.getresponse(); print(mode, r.status, r.read())
