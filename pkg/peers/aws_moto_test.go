package peers

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/autoscaling"
	astypes "github.com/aws/aws-sdk-go-v2/service/autoscaling/types"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/fwdproxy/fwdproxy/internal/awstest"
)

// The tests in this file run peer discovery against moto_server, an Auto Scaling and EC2
// implementation we did not write. moto does not serve the instance metadata service (IMDSv2), so
// the one test that finds the group from this instance's ID gets the ID from a small stand-in on
// loopback; everything else (the group, its instances, their states and private IPs) is moto's.

// motoGroup creates an Auto Scaling group of n instances in moto's default VPC and returns the
// clients and the instance IDs.
func motoGroup(t *testing.T, m *awstest.Moto, name string, n int32) (*autoscaling.Client, *ec2.Client, []string) {
	t.Helper()
	ctx := context.Background()
	cfg := m.Config()
	ec2c, asgc := ec2.NewFromConfig(cfg), autoscaling.NewFromConfig(cfg)
	imgs, err := ec2c.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(imgs.Images) == 0 {
		t.Fatalf("DescribeImages: %v (%d images)", err, len(imgs.Images))
	}
	lt, err := ec2c.CreateLaunchTemplate(ctx, &ec2.CreateLaunchTemplateInput{
		LaunchTemplateName: aws.String(name),
		LaunchTemplateData: &ec2types.RequestLaunchTemplateData{ImageId: imgs.Images[0].ImageId, InstanceType: ec2types.InstanceTypeT3Small},
	})
	if err != nil {
		t.Fatalf("CreateLaunchTemplate: %v", err)
	}
	subnets, err := ec2c.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{})
	if err != nil || len(subnets.Subnets) < 2 {
		t.Fatalf("DescribeSubnets: %v", err)
	}
	if _, err := asgc.CreateAutoScalingGroup(ctx, &autoscaling.CreateAutoScalingGroupInput{
		AutoScalingGroupName: aws.String(name),
		LaunchTemplate:       &astypes.LaunchTemplateSpecification{LaunchTemplateId: lt.LaunchTemplate.LaunchTemplateId, Version: aws.String("$Latest")},
		MinSize:              aws.Int32(n), MaxSize: aws.Int32(n + 2), DesiredCapacity: aws.Int32(n),
		VPCZoneIdentifier: aws.String(aws.ToString(subnets.Subnets[0].SubnetId) + "," + aws.ToString(subnets.Subnets[1].SubnetId)),
	}); err != nil {
		t.Fatalf("CreateAutoScalingGroup: %v", err)
	}
	out, err := asgc.DescribeAutoScalingGroups(ctx, &autoscaling.DescribeAutoScalingGroupsInput{AutoScalingGroupNames: []string{name}})
	if err != nil || len(out.AutoScalingGroups) != 1 {
		t.Fatalf("DescribeAutoScalingGroups: %v", err)
	}
	var ids []string
	for _, in := range out.AutoScalingGroups[0].Instances {
		ids = append(ids, aws.ToString(in.InstanceId))
	}
	if len(ids) != int(n) {
		t.Fatalf("moto launched %d instances, want %d", len(ids), n)
	}
	return asgc, ec2c, ids
}

// privateAddrs is what EC2 says the instances' private IPs are, at port, sorted.
func privateAddrs(t *testing.T, ec2c *ec2.Client, ids []string, port int) []string {
	t.Helper()
	out, err := ec2c.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{InstanceIds: ids})
	if err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for _, r := range out.Reservations {
		for _, in := range r.Instances {
			ip := aws.ToString(in.PrivateIpAddress)
			if net.ParseIP(ip) == nil {
				t.Fatalf("instance %s has no private IP (%q)", aws.ToString(in.InstanceId), ip)
			}
			addrs = append(addrs, net.JoinHostPort(ip, strconv.Itoa(port)))
		}
	}
	slices.Sort(addrs)
	return addrs
}

func TestAWSDiscoveryMoto(t *testing.T) {
	m := awstest.Start(t)
	asgc, ec2c, ids := motoGroup(t, m, "fwdproxy-fleet", 3)
	cfg := m.Config()
	cfg.BaseEndpoint = nil // the AWS source's own Endpoint field points it at moto
	a := &AWS{Region: awstest.Region, AutoScalingGroup: "fwdproxy-fleet", Endpoint: m.URL, Port: 7946, Config: &cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	got, err := a.Discover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := privateAddrs(t, ec2c, ids, 7946); len(got) != 3 || !slices.Equal(got, want) {
		t.Fatalf("peers %v, want the group's three private IPs %v", got, want)
	}

	// An instance put in standby (taken out of service by an operator) is no longer a peer.
	if _, err := asgc.EnterStandby(ctx, &autoscaling.EnterStandbyInput{
		AutoScalingGroupName: aws.String("fwdproxy-fleet"), InstanceIds: ids[:1], ShouldDecrementDesiredCapacity: aws.Bool(true),
	}); err != nil {
		t.Fatalf("EnterStandby: %v", err)
	}
	if got, err = a.Discover(ctx); err != nil {
		t.Fatal(err)
	}
	if want := privateAddrs(t, ec2c, ids[1:], 7946); !slices.Equal(got, want) {
		t.Fatalf("after standby of %s: peers %v, want %v", ids[0], got, want)
	}

	// A group that does not exist: the error names the settings to check.
	missing := &AWS{Region: awstest.Region, AutoScalingGroup: "no-such-group", Endpoint: m.URL, Port: 7946, Config: &cfg}
	if _, err := missing.Discover(ctx); err == nil || !strings.Contains(err.Error(), "peers.aws.autoScalingGroup") {
		t.Fatalf("missing group: err %v, want one naming peers.aws.autoScalingGroup", err)
	}
}

// TestAWSDiscoveryFindsOwnGroupMoto: with no group configured, the group is the one moto says
// this instance belongs to (DescribeAutoScalingInstances); the instance ID comes from an IMDSv2
// stand-in, since moto serves no instance metadata.
func TestAWSDiscoveryFindsOwnGroupMoto(t *testing.T) {
	m := awstest.Start(t)
	_, ec2c, ids := motoGroup(t, m, "fwdproxy-own", 2)
	motoGroup(t, m, "another-fleet", 1) // a second group, to be left alone
	imds := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "21600")
			fmt.Fprint(w, "token-moto")
		case r.URL.Path == "/latest/meta-data/instance-id" && r.Header.Get("X-Aws-Ec2-Metadata-Token") == "token-moto":
			fmt.Fprint(w, ids[1])
		default:
			http.NotFound(w, r)
		}
	}))
	defer imds.Close()
	cfg := m.Config()
	cfg.BaseEndpoint = nil
	a := &AWS{Region: awstest.Region, Endpoint: m.URL, IMDSEndpoint: imds.URL, Port: 7946, Config: &cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := a.Discover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := privateAddrs(t, ec2c, ids, 7946); !slices.Equal(got, want) {
		t.Fatalf("peers %v, want the own group's %v", got, want)
	}
}
